"""The command line's parameters: every click option once, grouped as the commands share them.

Each option's parameter is named after its ConvertOptions field, so a command builds its
options with ConvertOptions(**fields) and the options object checks them.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from volo_convert.architecture.variants import VARIANTS
from volo_convert.errors import ConversionError, first_line, one_line
from volo_convert.native_logs import show_everything
from volo_convert.options import (
    COMPUTE_DTYPES,
    DEFAULT_ATOL,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_COMPUTE_DTYPE,
    DEFAULT_DROP_PATH_RATE,
    DEFAULT_DROP_RATE,
    DEFAULT_HEAD,
    DEFAULT_INPUT,
    DEFAULT_MIN_TOP1,
    DEFAULT_SEED,
    DEFAULT_TFLITE_BATCH,
    DEFAULT_VERIFY_IMAGES,
    DEVICES,
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_INTERNAL_ERROR,
    FLOAT16_ATOL,
    HEADS,
    INPUTS,
    MANY_VERIFY_IMAGES,
    MAX_IMAGE_SIZE,
    MAX_SEED,
    MAX_TFLITE_BATCH,
    MAX_VERIFY_IMAGES,
    TFLITE_BATCH_DYNAMIC,
    TFLITE_DTYPES,
    TFLITE_IO,
)

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class InputError(click.ClickException):
    """A user mistake: printed as one line, exit code 2."""

    exit_code = EXIT_BAD_INPUT


class DefaultCommandGroup(click.Group):
    """A group that runs `convert` when the first argument names no command."""

    default_command = "convert"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


class InternalError(click.ClickException):
    """A bug in volo-convert: printed as one line, exit code 3."""

    exit_code = EXIT_INTERNAL_ERROR


def handles_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a command so that every way it can end reads as one line and one exit code.

    A library error (the user's mistake) exits 2; any other exception is a bug and exits
    3. `--debug` shows the traceback instead. (Stop signals are handled by `main`.)
    """

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:  # the reader of our output went away (`| head`): not a bug
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_BROKEN_PIPE)
        except ConversionError as error:
            if debug:
                raise
            raise InputError(one_line(str(error))) from None
        except (click.ClickException, click.exceptions.Exit):
            raise
        except Exception as error:
            if debug:
                raise
            raise InternalError(
                one_line(
                    f"internal error: {type(error).__name__}: {first_line(error)} (rerun with "
                    "--debug for the traceback, and please report it)"
                )
            ) from None

    return click.option(
        "--debug",
        is_flag=True,
        callback=_show_native_logs,
        help="Show the full traceback on errors, and the native libraries' start-up lines "
        "(for bug reports).",
    )(wrapper)


def start_keras() -> None:
    """Imports Keras, for the commands that build or run a model (not `--help`, not `inspect`).

    Keras refuses to start under an unknown KERAS_BACKEND: that is the user's setting, so
    it reads as bad input (exit 2) rather than an internal error. Importing it registers
    the custom layers and holds TensorFlow's start-up lines back (`import volo_convert`).
    """
    try:
        import keras  # noqa: F401
    except (ImportError, ValueError) as error:
        raise ConversionError(f"Keras cannot start: {error} (check KERAS_BACKEND)") from None


def _show_native_logs(context: click.Context, parameter: click.Parameter, debug: bool) -> bool:
    """`--debug` also shows the native lines held back so far, and holds back none after."""
    if debug:
        show_everything()
    return debug


def option_group(*options: Decorator) -> Decorator:
    """One decorator applying several click options, listed in `--help` in this order."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def atol_option(defaults: str) -> Decorator:
    """`--atol`, its help listing `defaults`: those of the files the command can meet."""
    return click.option(
        "--atol",
        type=click.FloatRange(min=0.0, min_open=True),
        help="Largest allowed absolute difference between the converted and PyTorch logits.  "
        f"[default: {defaults}]",
    )


def min_top1_option(defaults: str) -> Decorator:
    """`--min-top1`, its help listing `defaults`."""
    return click.option(
        "--min-top1",
        type=click.FloatRange(min=0.0, max=1.0, min_open=True),
        help="Smallest allowed top-1 agreement with PyTorch, as a fraction.  "
        f"[default: {defaults}]",
    )


def verify_images_option(defaults: str) -> Decorator:
    """`--verify-images`, its help listing `defaults`."""
    return click.option(
        "--verify-images",
        "--batch-size",
        "verify_images",
        type=click.IntRange(min=1, max=MAX_VERIFY_IMAGES),
        help=f"Number of seeded synthetic verification images.  [default: {defaults}]",
    )


# The defaults for every kind of file (convert, verify, batch), and for float32 files alone
# (demo, which writes a float32 .h5).
ATOL = atol_option(
    f"{DEFAULT_ATOL:g}; {FLOAT16_ATOL:g} for float16 TFLite; none for int8 and bfloat16"
)
MIN_TOP1 = min_top1_option(
    ", ".join(f"{value:g} for {dtype}" for dtype, value in DEFAULT_MIN_TOP1.items())
    + "; none for float and quantized files, which are judged against their weight-rounding "
    "floor"
)
FLOAT32_ATOL = atol_option(f"{DEFAULT_ATOL:g}")
FLOAT32_MIN_TOP1 = min_top1_option("none")
DEVICE = click.option(
    "--device",
    type=click.Choice(DEVICES),
    default=DEVICES[0],
    show_default=True,
    help="Where the PyTorch reference runs (auto: a GPU when present).",
)
VERIFY_IMAGES = verify_images_option(
    f"{DEFAULT_VERIFY_IMAGES}; {MANY_VERIFY_IMAGES} for float16 and int8 TFLite and bfloat16"
)
FLOAT32_VERIFY_IMAGES = verify_images_option(str(DEFAULT_VERIFY_IMAGES))

IMAGES = click.option(
    "--images",
    multiple=True,
    type=click.Path(path_type=str),
    help="Verify on these JPEG/PNG photos (a folder: its images; repeatable) instead of the "
    "synthetic images; prepared as timm's eval transform for VOLO.",
)
SEED = click.option(
    "--seed",
    type=click.IntRange(min=0, max=MAX_SEED),
    default=DEFAULT_SEED,
    show_default=True,
    help="Image seed.",
)
EXPLAIN = click.option(
    "--explain",
    is_flag=True,
    help="Compare every stage with PyTorch and name the first one out of tolerance "
    "(done anyway when parity fails).",
)
TRAINING = click.option(
    "--training",
    is_flag=True,
    help="Also train the model and PyTorch one SGD step on the same batch (BatchNorm on batch "
    "statistics, drop rates 0) and compare the logits, every weight's gradient and the "
    "weights after the step. Keras files only.",
)
DROP_RATE_RANGE = click.FloatRange(min=0.0, max=1.0, max_open=True)
DROP_PATH_RATE = click.option(
    "--drop-path-rate",
    type=DROP_RATE_RANGE,
    default=DEFAULT_DROP_PATH_RATE,
    show_default=True,
    help="Stochastic depth for fine-tuning, reached at the last transformer block (upstream "
    "fine-tunes d1 with 0.1, d2 with 0.2, d3 with 0.5). Identity in inference.",
)
DROP_RATE = click.option(
    "--drop-rate",
    type=DROP_RATE_RANGE,
    default=DEFAULT_DROP_RATE,
    show_default=True,
    help="Dropout after the position embedding, for fine-tuning. Identity in inference.",
)
VARIANT = click.option(
    "--variant",
    type=click.Choice(list(VARIANTS)),
    help="Override the variant detected from the tensor shapes.",
)
IMAGE_SIZE = click.option(
    "--image-size",
    type=int,  # ConvertOptions checks it: a multiple of 16, at most MAX_IMAGE_SIZE
    help=f"Input size in pixels (a multiple of 16, at most {MAX_IMAGE_SIZE}); pos_embed is "
    "resized if it differs.",
)
EMA = click.option("--ema", is_flag=True, help="Use the checkpoint's state_dict_ema.")
TRUST_CHECKPOINT = click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Allow pickles that run code when loaded. Only for files you trust.",
)
REPORT = click.option(
    "--report",
    type=click.Path(path_type=Path),
    help="Write the figures as JSON to this file (an output: it follows --overwrite).",
)
OVERWRITE = click.option(
    "--overwrite", is_flag=True, help="Replace the output files if they exist (never an input)."
)
JUNIT = click.option(
    "--junit",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the result as JUnit XML to this file (one test case per checkpoint), for CI "
    "test reports.",
)

JUNIT_PER_IMAGE = click.option(
    "--junit-per-image",
    is_flag=True,
    help="Add one test case per verification image to the --junit file: its name, each "
    "side's top-1 class and its max abs diff. An image fails only when the run fails and it "
    "missed the bar.",
)


def check_junit_path(
    junit: Path | None,
    inputs: list[Path],
    overwrite: bool,
    others: Mapping[Path, str] | None = None,
) -> None:
    """The --junit file is an output like the others: the same policy, before any work;
    `others` are the run's other outputs (path -> what it is)."""
    if junit is not None:
        from volo_convert.paths import check_output_path

        check_output_path(junit, overwrite, inputs=inputs, others=others)


def input_option(default: str) -> Decorator:
    """`--input`; `default` says what it is when not given, for this command."""
    return click.option(
        "--input",
        type=click.Choice(INPUTS),
        help="images: ImageNet-normalised float32 input; pixels: RGB values 0..255 (uint8 or "
        f"float32), scaled and normalised inside the model.  [default: {default}]",
    )


def compute_dtype_option(default: str) -> Decorator:
    """`--compute-dtype`; `default` says what it is when not given, for this command."""
    return click.option(
        "--compute-dtype",
        type=click.Choice(COMPUTE_DTYPES),
        help="What a Keras file or SavedModel computes in: float32, or bfloat16 with float32 "
        "weights (Keras' mixed_bfloat16; LayerNorm, softmax, residual adds and logits stay "
        "float32), faster on CPUs with bfloat16 instructions, slower on others; judged by "
        f"top-1 agreement.  [default: {default}]",
    )


INPUT = input_option(DEFAULT_INPUT)  # what a conversion writes
COMPUTE_DTYPE = compute_dtype_option(DEFAULT_COMPUTE_DTYPE)
MODEL_INPUT = input_option("what MODEL takes")  # what a verification checks
MODEL_COMPUTE_DTYPE = compute_dtype_option("what MODEL computes in")
TFLITE_DTYPE = click.option(
    "--tflite-dtype",
    type=click.Choice(TFLITE_DTYPES),
    default=TFLITE_DTYPES[0],
    show_default=True,
    help="Precision of a .tflite output: float32, float16 weights, int8 weights with float "
    "activations (int8-dynamic), or full integer (int8, calibrated).",
)
REQUIRE_GPU_COMPATIBLE = click.option(
    "--require-gpu-compatible",
    is_flag=True,
    help="Refuse a .tflite file that TensorFlow's model analyzer finds the GPU delegate "
    "cannot run (the file is never written). Every .tflite file records which delegates "
    "can run it; inspect shows it.",
)
TFLITE_IO_OPTION = click.option(
    "--tflite-io",
    type=click.Choice(TFLITE_IO),
    default=TFLITE_IO[0],
    show_default=True,
    help="Input type of an int8 TFLite file: float32 (quantized inside), or int8 (uint8 with "
    "--input pixels); its logits are float32 either way.",
)
TFLITE_BATCH = click.option(
    "--tflite-batch",
    default=str(DEFAULT_TFLITE_BATCH),
    show_default=True,
    metavar=f"N|{TFLITE_BATCH_DYNAMIC}",
    help="Batch dimension of a .tflite file's input signature: N images per invocation "
    f"(1 to {MAX_TFLITE_BATCH}; 1 is the phone case), or {TFLITE_BATCH_DYNAMIC} (any batch, "
    "set with the interpreter's resize_tensor_input).",
)
CALIBRATION_IMAGES = click.option(
    "--calibration-images",
    multiple=True,
    type=click.Path(path_type=str),
    help="JPEG/PNG photos (a folder: its images; repeatable) to calibrate an int8 TFLite file "
    f"on.  [default: {DEFAULT_CALIBRATION_IMAGES} seeded synthetic images]",
)

verification_options = option_group(ATOL, MIN_TOP1, DEVICE, VERIFY_IMAGES, SEED, IMAGES)
float32_verification_options = option_group(
    FLOAT32_ATOL, FLOAT32_MIN_TOP1, DEVICE, FLOAT32_VERIFY_IMAGES, SEED, IMAGES
)
checkpoint_options = option_group(VARIANT, IMAGE_SIZE, EMA, TRUST_CHECKPOINT)


def head_option(default: str | None, help_text: str) -> Decorator:
    """The `--head` option: which output the Keras model ends in."""
    return click.option(
        "--head",
        type=click.Choice(HEADS),
        default=default,
        show_default=default is not None,
        help=help_text,
    )


# What a conversion writes beyond its format, shared by `convert` and `batch`.
output_options = option_group(
    TFLITE_DTYPE,
    TFLITE_IO_OPTION,
    TFLITE_BATCH,
    REQUIRE_GPU_COMPATIBLE,
    CALIBRATION_IMAGES,
    COMPUTE_DTYPE,
    INPUT,
)
CONVERT_HEAD = head_option(
    DEFAULT_HEAD,
    "full: the published logits (class head + 0.5 x max of the aux head); cls: the class "
    "head alone; features: no head, the normalised class token (B, C) for transfer learning.",
)
