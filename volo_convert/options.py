"""What a conversion, a verification or a batch can be told: choices, defaults, validation.

Torch-free and Keras-free, so the CLI can build and check the options before importing
either. Each option's choices and default live here once; the click options, the library
and the reports read them from here.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os

from volo_convert.errors import ConversionError

EXIT_PARITY_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 3  # a bug in volo-convert; a signal exits with 128 + its number
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: whoever read the output stopped reading
EXIT_CODES_HELP = (
    "Exit codes: 0 passed, 1 parity failed, 2 bad input or usage, 3 a bug in volo-convert "
    "(please report it), 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."
)

# What the model ends in: the published logits (class head plus half the max over the aux
# head), the class head alone, or the normalised class token (transfer-learning features).
HEADS = ("full", "cls", "features")
DEFAULT_HEAD = "full"
DEVICES = ("auto", "cpu", "cuda")
SAVEDMODEL = "savedmodel"  # a folder: an output path without extension, or ending in "/"
FORMATS = ("h5", "keras", SAVEDMODEL, "tflite")
KERAS_FORMATS = ("h5", "keras")  # Keras model files: what --training can check
# float32, float16 weights, int8 weights with float activations, full integer.
TFLITE_DTYPES = ("float32", "float16", "int8-dynamic", "int8")
QUANTIZED_DTYPES = ("int8-dynamic", "int8")  # judged by top-1 agreement, not by atol
# What a Keras model or SavedModel computes in: float32, or bfloat16 with float32 weights
# (Keras' mixed_bfloat16 policy), faster on CPUs with bfloat16 instructions.
COMPUTE_DTYPES = ("float32", "bfloat16")
DEFAULT_COMPUTE_DTYPE = "float32"
# A file's precision, which sets how it is verified: a TFLITE_DTYPES entry, or bfloat16.
# These are judged by top-1 agreement and described by max and mean abs diff, with no atol.
TOP1_JUDGED = (*QUANTIZED_DTYPES, "bfloat16")
# An int8 TFLite file's input: float32 (quantized inside), or int8 (uint8 for pixels).
TFLITE_IO = ("float32", "int8")
# The batch dimension of a TFLite file's input signature: a whole number (1, the phone case,
# by default), or `dynamic` (any batch, set by the runtime's resize_tensor_input). A fixed-N
# file takes exactly N images per invocation. 256 is far beyond what batching buys on a
# CPU, and the interpreter allocates every activation for the whole batch up front.
TFLITE_BATCH_DYNAMIC = "dynamic"
DEFAULT_TFLITE_BATCH = 1
MAX_TFLITE_BATCH = 256
# What the model takes: ImageNet-normalised float32 images, or RGB pixels in 0..255 that
# the model scales and normalises itself.
INPUTS = ("images", "pixels")
DEFAULT_INPUT = "images"
# VOLO's pos_embed grid is the image at stride 16 (patch 8, then a 2x2 downsample).
IMAGE_SIZE_MULTIPLE = 16

DEFAULT_ATOL = 1e-4
# float16 weights carry 11 significant bits: they moved the logits of d1 and d2 by up to
# 1.5e-2 (docs/FORMATS.md, float16 tolerance), so such files get about three times that by default.
FLOAT16_ATOL = 5e-2
DEFAULT_VERIFY_IMAGES = 2  # float32 files: every logit within atol says more than top-1
# float16 and quantized files are judged, or described, by top-1 agreement: a fraction
# needs enough images to mean something.
MANY_VERIFY_IMAGES = 64
# bfloat16 rounds far less than int8 (docs/FORMATS.md, "bfloat16 compute"): a working file keeps
# nearly every top-1, a broken one few, and 0.9 still allows for the close calls of
# synthetic images, whose top-2 margins are smaller than a trained model's on photos.
# Quantized files have no raw top-1 bar by default: near-ties make it a coin toss on weights
# whose int8 rounding alone flips 15% of top-1s (issue 20). They are judged against their
# weight-rounding floor instead (checks/weight_floor.py, docs/FORMATS.md "Quantized TFLite").
DEFAULT_MIN_TOP1 = {"bfloat16": 0.9}
# A quantized file's mean abs logit diff may be at most this many times the floor's. Working
# files measured 1.17-1.44x (int8-dynamic) and 1.31-2.16x (int8) over 3 weight styles x 3
# seeds (docs/BENCHMARKS.md, "int8 against its weight-rounding floor"); plain full-integer
# quantization, the broken scheme, had 10x the shipped scheme's error (docs/FORMATS.md). The
# bars sit above every working figure and far below broken ones.
MAX_FLOOR_RATIO = {"int8-dynamic": 2.0, "int8": 3.0}
# An image's float top-1 margin is clear of quantization noise at this many times the floor's
# largest abs logit diff on that image (2 would keep the floor from flipping it; 4 leaves a
# file twice the floor's noise there). On such images a quantized file must keep every top-1.
# Per image, not per set: heavy-tailed weights put flips at 11x the floor's mean abs diff.
CLEAR_MARGIN_MULTIPLE = 4.0
MIN_CLEAR_TOP1 = 1.0
# What to try when a quantized file misses its floor bars.
QUANTIZATION_REMEDY = {
    "int8": "try --calibration-images with a few dozen real photos, or --tflite-dtype int8-dynamic",
    "int8-dynamic": "try --tflite-dtype float16",
}
DEFAULT_SEED = 0
# How synthetic weights are drawn (synthetic.py): "realistic" (asymmetric, peaked attention),
# "upstream-init" (VOLO's own initialisation, attention scaled until peaked) and
# "trained-like" (realistic, plus heavy-tailed kernels and outlier channels entering every
# LayerNorm, as trained transformers have).
WEIGHT_STYLES = ("realistic", "upstream-init", "trained-like")
# Static bounds, checked by click before any work; the memory a verification batch needs is
# then checked against the machine's available memory once the image size is known.
MAX_SEED = 2**64 - 1  # torch.Generator's seed is an unsigned 64-bit integer
MAX_VERIFY_IMAGES = 4096
MAX_IMAGE_SIZE = 4096  # 8x the largest release size (512)
# Training-time regularisation, identity in inference. Upstream's fine-tuning recipes use
# drop path 0.1 (d1), 0.2 (d2) and 0.5 (d3), larger for d4 and d5; dropout stays at 0.
DEFAULT_DROP_PATH_RATE = 0.0
DEFAULT_DROP_RATE = 0.0
# The training check (verify --training): tolerances on each tensor's relative L2 error.
# Gradients agree to about 1e-5, except where TensorFlow sums over every stem position
# (batch x S/2 x S/2) in float32: the stem's gradients were 9.5e-4 to 2.4e-3 off at d1 224px
# batch 2 (depending on the images) and 2.2e-3 at batch 8, while torch's own float32 run is
# 5e-6 to 3e-4 from float64 there. A wrong transform puts a tensor about 1 off.
TRAINING_GRADIENT_RTOL = 1e-2
TRAINING_STEP_RTOL = 1e-2  # an SGD step inherits its gradient's error
TRAINING_STATISTICS_RTOL = 1e-3
TRAINING_LEARNING_RATE = 0.1
# The default calibration set for int8: seeded synthetic images, a seed apart from the
# verification images so the file is not judged on the images it was calibrated on.
DEFAULT_CALIBRATION_IMAGES = 32
CALIBRATION_SEED = 1000
DEFAULT_TOP_K = 5  # classes `predict` shows per image


class Status(enum.StrEnum):
    """The outcome of one conversion or verification, as reports spell it."""

    PASSED = "passed"
    FAILED = "failed"  # parity failed
    UNVERIFIED = "unverified"  # --no-verify
    SKIPPED = "skipped"  # a batch found it done by an earlier run
    ERROR = "error"  # a batch file that could not be converted


# The check functions below raise a ConversionError (exit 2) where they check a user's input,
# here when options are built. The library calls them again on values that were checked
# already, with `error=ValueError`: failing there is a bug, which must exit 3, not 2.


def check_choice(
    name: str, value: str, choices: tuple[str, ...], error: type[Exception] = ConversionError
) -> None:
    """Raises `error` unless `value` is one of `choices`."""
    if value not in choices:
        raise error(f"unknown {name} {value!r}, expected one of {', '.join(choices)}")


def check_image_size(image_size: int, error: type[Exception] = ConversionError) -> None:
    """Raises `error` unless `image_size` is a positive multiple of 16 in bounds."""
    if image_size <= 0 or image_size % IMAGE_SIZE_MULTIPLE:
        raise error(
            f"image size must be a positive multiple of {IMAGE_SIZE_MULTIPLE}, got {image_size}"
        )
    if image_size > MAX_IMAGE_SIZE:
        raise error(f"image size must be at most {MAX_IMAGE_SIZE}, got {image_size}")


def check_rate(name: str, rate: float, error: type[Exception] = ConversionError) -> None:
    """Raises `error` unless 0 <= `rate` < 1 (a drop probability)."""
    if not 0.0 <= rate < 1.0:
        raise error(f"{name} must be at least 0 and below 1, got {rate}")


def check_tflite_io(
    tflite_dtype: str, tflite_io: str, error: type[Exception] = ConversionError
) -> None:
    """Raises `error` unless the TFLite dtype and IO type are known and go together: an
    int8 input and output belong to a full-integer file only."""
    check_choice("TFLite dtype", tflite_dtype, TFLITE_DTYPES, error)
    check_choice("TFLite IO type", tflite_io, TFLITE_IO, error)
    if tflite_io != TFLITE_IO[0] and tflite_dtype != "int8":
        raise error(f"--tflite-io {tflite_io} needs --tflite-dtype int8 (full integer)")


def tflite_batch(value: int | str) -> int | str:
    """A TFLite batch as given (a whole number, its text, or `dynamic`), checked: N or `dynamic`."""
    if value == TFLITE_BATCH_DYNAMIC:
        return value
    text = str(value).strip()
    if not isinstance(value, bool) and text.isdecimal() and 1 <= int(text) <= MAX_TFLITE_BATCH:
        return int(text)
    raise ConversionError(
        f"--tflite-batch must be a whole number from 1 to {MAX_TFLITE_BATCH}, or "
        f"{TFLITE_BATCH_DYNAMIC}, got {value!r}"
    )


def file_precision(tflite_dtype: str, compute_dtype: str) -> str:
    """What a file's numerics are judged as: its TFLite dtype, else its compute dtype."""
    return tflite_dtype if tflite_dtype != TFLITE_DTYPES[0] else compute_dtype


def judged_by_top1(precision: str) -> str | None:
    """How a file of `precision` is named where top-1 agreement judges it; None if atol does."""
    if precision not in TOP1_JUDGED:
        return None
    return "a quantized file" if precision in QUANTIZED_DTYPES else f"a {precision} file"


def default_atol(precision: str) -> float | None:
    """The tolerance when none is given: looser for float16, none for TOP1_JUDGED files."""
    if precision in TOP1_JUDGED:
        return None
    return FLOAT16_ATOL if precision == "float16" else DEFAULT_ATOL


def default_min_top1(precision: str) -> float | None:
    """The top-1 agreement bar when none is given: for TOP1_JUDGED files only."""
    return DEFAULT_MIN_TOP1.get(precision)


def default_max_floor_ratio(precision: str) -> float | None:
    """The bar on a file's error over its weight-rounding floor's: quantized files only."""
    return MAX_FLOOR_RATIO.get(precision)


def default_verify_images(precision: str) -> int:
    """How many synthetic images verify a file when no count is given."""
    return DEFAULT_VERIFY_IMAGES if precision == "float32" else MANY_VERIFY_IMAGES


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """Everything a conversion or verification can be told; checked once, when built.

    `head` and `input` None mean `full` and `images` for a conversion and, for a
    verification, what the model has. `atol` None means DEFAULT_ATOL, FLOAT16_ATOL for
    float16 weights and no atol bar for quantized files; `min_top1` None means
    DEFAULT_MIN_TOP1 where it has an entry (bfloat16), else no top-1 bar; quantized files
    are always held to MAX_FLOOR_RATIO and clear-margin agreement. `verify_images` None means
    `default_verify_images`. `images` are photo files or folders verified on instead of
    the synthetic images; `calibration_images` those an int8 file is calibrated on.
    `explain` adds the per-stage diagnosis, which a failed parity check adds anyway.
    `training` adds the training-mode check (gradients and one SGD step) of a Keras model.
    `drop_path_rate` and `drop_rate` go into the converted model, for fine-tuning.
    `compute_dtype` None means float32 for a conversion and, for a verification, what the
    model computes in; bfloat16 is judged by top-1 agreement, like a quantized file.
    `tflite_batch` is a TFLite file's batch dimension: N, or `dynamic` (`tflite_batch`).
    `require_gpu_compatible` refuses a TFLite file the GPU delegate could not run.
    """

    variant: str | None = None
    image_size: int | None = None
    output_format: str | None = None
    tflite_dtype: str = TFLITE_DTYPES[0]
    tflite_io: str = TFLITE_IO[0]
    tflite_batch: int | str = DEFAULT_TFLITE_BATCH
    require_gpu_compatible: bool = False
    input: str | None = None
    atol: float | None = None
    min_top1: float | None = None
    device: str = DEVICES[0]
    verify: bool = True
    verify_images: int | None = None
    seed: int = DEFAULT_SEED
    images: tuple[str, ...] = ()
    calibration_images: tuple[str, ...] = ()
    ema: bool = False
    trust_checkpoint: bool = False
    overwrite: bool = False
    head: str | None = None
    explain: bool = False
    training: bool = False
    drop_path_rate: float = DEFAULT_DROP_PATH_RATE
    drop_rate: float = DEFAULT_DROP_RATE
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        for field in ("images", "calibration_images"):  # one path, or any sequence of them
            paths = getattr(self, field)
            paths = (paths,) if isinstance(paths, str | os.PathLike) else paths
            object.__setattr__(self, field, tuple(str(path) for path in paths))
        if self.image_size is not None:
            check_image_size(self.image_size)
        if self.output_format is not None:
            check_choice("format", self.output_format, FORMATS)
        check_tflite_io(self.tflite_dtype, self.tflite_io)
        object.__setattr__(self, "tflite_batch", tflite_batch(self.tflite_batch))
        if self.calibration_images and self.tflite_dtype != "int8":
            raise ConversionError("--calibration-images applies to --tflite-dtype int8 only")
        if self.input is not None:
            check_choice("input", self.input, INPUTS)
        check_choice("device", self.device, DEVICES)
        if self.head is not None:
            check_choice("head", self.head, HEADS)
        if self.atol is not None and not (math.isfinite(self.atol) and self.atol > 0):
            raise ConversionError(f"atol must be a positive, finite number, got {self.atol}")
        if self.min_top1 is not None and not 0 < self.min_top1 <= 1:
            raise ConversionError(f"--min-top1 must be in (0, 1], got {self.min_top1}")
        if self.verify_images is not None and not 1 <= self.verify_images <= MAX_VERIFY_IMAGES:
            raise ConversionError(
                f"--verify-images must be between 1 and {MAX_VERIFY_IMAGES}, "
                f"got {self.verify_images}"
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise ConversionError(f"seed must be between 0 and 2**64 - 1, got {self.seed}")
        if self.compute_dtype is not None:
            check_choice("compute dtype", self.compute_dtype, COMPUTE_DTYPES)
        self.check_precision(file_precision(self.tflite_dtype, self.output_compute_dtype))
        if self.images and self.verify_images is not None:
            raise ConversionError("--images verifies on every photo given; drop --verify-images")
        if self.explain and not self.verify:
            raise ConversionError("--explain compares with PyTorch, so it needs verification")
        if self.training and not self.verify:
            raise ConversionError("--training compares with PyTorch, so it needs verification")
        check_rate("drop path rate", self.drop_path_rate)
        check_rate("drop rate", self.drop_rate)
        if self.output_format is not None:
            self.check_format(self.output_format)

    def check_format(self, fmt: str) -> None:
        """Refuses the options that do not apply to the output format `fmt`; called when
        built if the format is named, else once the output path names it."""
        if self.tflite_dtype != TFLITE_DTYPES[0] and fmt != "tflite":
            raise ConversionError(
                f"--tflite-dtype {self.tflite_dtype} applies to .tflite outputs only"
            )
        if self.tflite_batch != DEFAULT_TFLITE_BATCH and fmt != "tflite":
            raise ConversionError(
                f"--tflite-batch {self.tflite_batch} applies to .tflite outputs only; other "
                "formats take any batch"
            )
        if self.require_gpu_compatible and fmt != "tflite":
            raise ConversionError("--require-gpu-compatible applies to .tflite outputs only")
        if self.output_compute_dtype != DEFAULT_COMPUTE_DTYPE and fmt == "tflite":
            raise ConversionError(
                f"--compute-dtype {self.output_compute_dtype} applies to Keras files and "
                "SavedModels, not .tflite; use --tflite-dtype for a smaller TFLite file"
            )

    def check_precision(self, precision: str, head: str | None = None) -> None:
        """Refuses what a file of `precision` cannot be verified with.

        A conversion calls it once its options are built; a verification again with the
        precision and head of the file it loaded (`head` None: the one asked for).
        """
        if self.min_top1 is not None and (head or self.head) == "features":
            raise ConversionError(
                "--min-top1 bars top-1 agreement, which the features head has not; features "
                "are judged by --atol"
            )
        judged = judged_by_top1(precision)
        if judged is None:
            return
        if self.verify_images is not None and self.verify_images < MANY_VERIFY_IMAGES:
            raise ConversionError(
                f"{judged} is judged on at least {MANY_VERIFY_IMAGES} images, "
                f"got --verify-images {self.verify_images}"
            )
        if (head or self.head) == "features":
            remedy = (
                "--compute-dtype float32"
                if precision in COMPUTE_DTYPES
                else "--tflite-dtype float32 or float16"
            )
            raise ConversionError(
                f"{judged} is judged by top-1 agreement, which the features head has not; "
                f"use {remedy} for features"
            )
        if precision not in COMPUTE_DTYPES:
            return
        for flag, given in (("--training", self.training), ("--explain", self.explain)):
            if given:
                raise ConversionError(
                    f"{flag} holds every tensor to a float32 tolerance, which {precision} compute "
                    f"cannot meet; drop {flag}, or use --compute-dtype float32"
                )

    @property
    def output_compute_dtype(self) -> str:
        """What a conversion's model computes in."""
        return self.compute_dtype or DEFAULT_COMPUTE_DTYPE

    @property
    def output_head(self) -> str:
        """The head a conversion writes."""
        return self.head or DEFAULT_HEAD

    @property
    def output_input(self) -> str:
        """The input a conversion's model takes."""
        return self.input or DEFAULT_INPUT


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """How every checkpoint of a batch is converted: one set of ConvertOptions for all,
    checked once when built, with the format always named (the batch names each output).

    Each file's output replaces an earlier run's (it is verified before it does), so
    `convert.overwrite` is implied; `force` converts again files found done.
    """

    convert: ConvertOptions = dataclasses.field(
        default_factory=lambda: ConvertOptions(output_format=KERAS_FORMATS[0], overwrite=True)
    )
    force: bool = False

    def __post_init__(self) -> None:
        check_choice("batch format", self.convert.output_format or "", FORMATS)


DEFAULT_CONVERT_OPTIONS = ConvertOptions()
DEFAULT_BATCH_OPTIONS = BatchOptions()
