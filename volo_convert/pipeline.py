"""The conversion pipeline: load, detect, build, port, save, verify, move into place."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import torch

from volo_convert.architecture.keras_model import build_volo, model_head
from volo_convert.architecture.variants import VoloConfig, crop_pct, detect_config, get_variant
from volo_convert.checks.diagnosis import diagnose
from volo_convert.checks.images import normalize, sample_pixels
from volo_convert.checks.parity import check_parity
from volo_convert.checks.photos import load_photos
from volo_convert.checks.reference import resolve_device, run_reference
from volo_convert.errors import ConversionError, about
from volo_convert.formats import (
    Predictor,
    artifact_format,
    check_backend,
    input_contract,
    load_artifact,
    output_format,
    runtime_name,
    save_model,
    weight_dtype,
)
from volo_convert.formats.contract import InputContract
from volo_convert.formats.staging import check_output_path, move_into_place, staged_output
from volo_convert.options import (
    CALIBRATION_SEED,
    DEFAULT_ATOL,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_CONVERT_OPTIONS,
    DEFAULT_HEAD,
    MANY_VERIFY_IMAGES,
    QUANTIZED_DTYPES,
    SAVEDMODEL,
    TFLITE_DTYPES,
    ConvertOptions,
    default_atol,
    default_min_top1,
    default_verify_images,
)
from volo_convert.results import ConversionResult
from volo_convert.weights.checkpoint import check_finite, load_state_dict, tensor_shapes
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.memory import MappedCheckpoint
from volo_convert.weights.porting import port_weights
from volo_convert.weights.resolution import resize_pos_embed

StageCallback = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint's tensors and the architecture they fit, resized to `image_size`."""

    state_dict: dict[str, torch.Tensor]
    config: VoloConfig
    image_size: int

    def parameter_count(self, head: str) -> int:
        """Weights of the model ending in `head`: the checkpoint tensors it keeps.

        The same figure as `keras.Model.count_params()`, for files that keep no such count.
        """
        return sum(
            self.state_dict[mapping.torch_key].numel()
            for mapping in weight_mappings(self.config, head)
            if mapping.keras_path is not None and mapping.torch_key in self.state_dict
        )


def _notify(on_stage: StageCallback | None, stage: str) -> None:
    if on_stage is not None:
        on_stage(stage)


def load_checkpoint(path: str | Path, options: ConvertOptions) -> LoadedCheckpoint:
    """Reads a checkpoint, finds its architecture and resizes pos_embed if asked to.

    `options.variant` overrides the detected variant (keeping the checkpoint's class
    count); `options.image_size` converts to another input size.
    """
    state_dict = load_state_dict(path, ema=options.ema, trust_checkpoint=options.trust_checkpoint)
    with about(path):
        config, image_size = detect_config(tensor_shapes(state_dict))
    if options.variant is not None:
        config = get_variant(options.variant).with_num_classes(config.num_classes)
    check_finite(state_dict, path)
    if options.image_size is not None and options.image_size != image_size:
        state_dict["pos_embed"] = resize_pos_embed(state_dict["pos_embed"], options.image_size)
        image_size = options.image_size
    return LoadedCheckpoint(state_dict, config, image_size)


def _photos(paths: tuple[str, ...], checkpoint: LoadedCheckpoint) -> np.ndarray:
    """The photos at `paths` as B, S, S, 3 uint8 pixels, prepared for this checkpoint."""
    size = checkpoint.image_size
    return load_photos(paths, size, crop_pct(checkpoint.config.name, size))


def _verification_pixels(
    options: ConvertOptions, checkpoint: LoadedCheckpoint, dtype: str
) -> np.ndarray | None:
    """The photos to verify a `dtype` file on, or None for the synthetic images.

    A quantized file is judged by top-1 agreement, so it needs MANY_VERIFY_IMAGES photos.
    """
    if not options.images:
        return None
    pixels = _photos(options.images, checkpoint)
    if dtype in QUANTIZED_DTYPES and len(pixels) < MANY_VERIFY_IMAGES:
        raise ConversionError(
            f"--images gave {len(pixels)} readable images, but a quantized file is judged on "
            f"at least {MANY_VERIFY_IMAGES}"
        )
    return pixels


def _calibration_inputs(options: ConvertOptions, checkpoint: LoadedCheckpoint) -> np.ndarray | None:
    """What an int8 file is calibrated on, as the model takes it; None for other files.

    The photos of `--calibration-images`, else DEFAULT_CALIBRATION_IMAGES seeded synthetic
    images (a seed apart from the verification images).
    """
    if options.tflite_dtype != "int8":
        return None
    if options.calibration_images:
        pixels = _photos(options.calibration_images, checkpoint)
    else:
        pixels = sample_pixels(DEFAULT_CALIBRATION_IMAGES, checkpoint.image_size, CALIBRATION_SEED)
    return pixels.astype(np.float32) if options.output_input == "pixels" else normalize(pixels)


def _keras_graph(model: Predictor, checkpoint: LoadedCheckpoint, head: str) -> keras.Model:
    """`model` itself if it is Keras; else the Keras graph a SavedModel/TFLite came from."""
    if isinstance(model, keras.Model):
        return model
    rebuilt = build_volo(checkpoint.config, checkpoint.image_size, head, input_contract(model).kind)
    port_weights(rebuilt, checkpoint.state_dict, weight_mappings(checkpoint.config, head))
    return rebuilt


def _verify(
    model: Predictor,
    checkpoint: LoadedCheckpoint,
    options: ConvertOptions,
    pixels: np.ndarray | None,
    device: torch.device,
    result: ConversionResult,
    on_stage: StageCallback | None,
) -> None:
    """Fills in `result`'s parity and timing, and its diagnosis if asked for or failed.

    The reference runs once, on `pixels` (photos) or else the seeded synthetic images;
    parity and diagnosis both read that run. A SavedModel or TFLite file has no stage
    outputs to read, so the Keras graph it was exported from is diagnosed (against
    DEFAULT_ATOL where the file has no atol bar): if every stage of that passes, the
    export lost the parity.
    """
    _notify(on_stage, "verifying")
    started = time.perf_counter()
    dtype = weight_dtype(model)
    reference = run_reference(
        checkpoint.config,
        checkpoint.image_size,
        checkpoint.state_dict,
        head=result.head,
        device=device,
        pixels=pixels,
        batch_size=options.verify_images or default_verify_images(dtype),
        seed=options.seed,
    )
    atol = default_atol(dtype) if options.atol is None else options.atol
    min_top1 = default_min_top1(dtype) if options.min_top1 is None else options.min_top1
    result.parity = check_parity(model, reference, atol, min_top1)
    result.verify_seconds = time.perf_counter() - started
    if options.explain or not result.parity.passed:
        _notify(on_stage, "diagnosing")
        graph = _keras_graph(model, checkpoint, result.head)
        diagnosis_atol = DEFAULT_ATOL if atol is None else atol
        result.diagnosis = diagnose(graph, checkpoint.config, reference, diagnosis_atol)


def _build_and_port(
    checkpoint_path: str | Path,
    checkpoint: LoadedCheckpoint,
    options: ConvertOptions,
    on_stage: StageCallback | None,
) -> keras.Model:
    """The Keras model filled from the checkpoint, holding the weights once in memory."""
    # Hand back each mapped tensor's pages once read, so the weights are held once, in Keras.
    mapped = MappedCheckpoint(checkpoint_path)
    mapped.release_all(checkpoint.state_dict.values())
    _notify(on_stage, "building")
    head = options.output_head
    model = build_volo(checkpoint.config, checkpoint.image_size, head, options.output_input)
    _notify(on_stage, "porting")
    with about(checkpoint_path):
        port_weights(
            model,
            checkpoint.state_dict,
            weight_mappings(checkpoint.config, head),
            on_tensor=lambda torch_key: mapped.release(checkpoint.state_dict[torch_key]),
        )
    return model


def _save(
    model: keras.Model,
    temp_path: Path,
    output_path: Path,
    fmt: str,
    options: ConvertOptions,
    calibration: np.ndarray | None,
) -> None:
    """Writes the staged file, naming the user's path if the disk refuses."""
    try:
        save_model(model, temp_path, fmt, options.tflite_dtype, options.tflite_io, calibration)
    except OSError as error:
        what = "SavedModel folder" if fmt == SAVEDMODEL else f"{fmt} file"
        raise ConversionError(
            f"{output_path}: could not write the {what} ({error.strerror or error})"
        ) from None


def convert(
    checkpoint_path: str | Path,
    output_path: str | Path,
    options: ConvertOptions = DEFAULT_CONVERT_OPTIONS,
    on_stage: StageCallback | None = None,
) -> ConversionResult:
    """Converts one checkpoint to a model file and, unless told not to, verifies it.

    The file (or SavedModel folder) is written beside `output_path` under a temporary
    name, reloaded and verified from disk in its format's runtime, and only then moved
    into place. A failed verification leaves nothing at `output_path` and returns a
    result whose `passed` is False (with a per-stage diagnosis).

    Args:
        checkpoint_path: the PyTorch checkpoint.
        output_path: where the model goes; its extension picks the format (`.h5`,
            `.keras`, `.tflite`, none for a SavedModel folder) unless the options name one.
        options: see `ConvertOptions`.
        on_stage: called with each stage's name as it starts.
    """
    output_path = Path(output_path)
    fmt = output_format(output_path, options.output_format)
    if options.tflite_dtype != TFLITE_DTYPES[0] and fmt != "tflite":
        raise ConversionError(
            f"--tflite-dtype {options.tflite_dtype} applies to .tflite outputs only"
        )
    check_backend(fmt)
    check_output_path(output_path, options.overwrite, folder=fmt == SAVEDMODEL)
    device = resolve_device(options.device) if options.verify else None

    started = time.perf_counter()
    _notify(on_stage, "loading")
    checkpoint = load_checkpoint(checkpoint_path, options)
    pixels = _verification_pixels(options, checkpoint, options.tflite_dtype) if device else None
    calibration = _calibration_inputs(options, checkpoint)
    model = _build_and_port(checkpoint_path, checkpoint, options, on_stage)
    result = ConversionResult(
        checkpoint=str(checkpoint_path),
        output=str(output_path),
        variant=checkpoint.config.name,
        image_size=checkpoint.image_size,
        num_classes=checkpoint.config.num_classes,
        parameters=int(model.count_params()),
        head=options.output_head,
        output_format=fmt,
        runtime=runtime_name(fmt) if options.verify else None,
        tflite_dtype=options.tflite_dtype if fmt == "tflite" else None,
    )
    with staged_output(output_path, folder=fmt == SAVEDMODEL) as temp_path:
        _notify(on_stage, "saving")
        _save(model, temp_path, output_path, fmt, options, calibration)
        del model
        result.convert_seconds = time.perf_counter() - started
        if device is not None or fmt == "tflite":  # a TFLite file's input scale is in the file
            loaded = load_artifact(temp_path, fmt)
            result.input = input_contract(loaded).to_dict()
            if device is not None:
                _verify(loaded, checkpoint, options, pixels, device, result, on_stage)
            del loaded
        else:
            result.input = InputContract(options.output_input).to_dict()
        if result.passed:
            if output_path.exists() and not options.overwrite:
                raise ConversionError(
                    f"{output_path}: appeared while converting; pass --overwrite to replace it"
                )
            move_into_place(temp_path, output_path)
    return result


def _artifact_head(model: Predictor, config: VoloConfig, requested: str | None) -> str:
    """The head `model` ends in: read from a Keras graph, else from the output width.

    A SavedModel or TFLite file keeps no layer names, and `full` and `cls` have the same
    width, so there `--head cls` must be given; `features` shows in the width.
    """
    if isinstance(model, keras.Model):
        head = model_head(model)
    elif model.output_shape[-1] == config.embed_dims[-1] != config.num_classes:
        head = "features"
    else:
        head = requested or DEFAULT_HEAD
    if requested is not None and requested != head:
        raise ConversionError(
            f"the model ends in the {head} head, but --head {requested} was given"
        )
    return head


def verify_file(
    model_path: str | Path,
    checkpoint_path: str | Path,
    options: ConvertOptions = DEFAULT_CONVERT_OPTIONS,
    on_stage: StageCallback | None = None,
) -> ConversionResult:
    """Verifies an existing model against the checkpoint it was converted from.

    `model_path` is a `.h5` or `.keras` file, a SavedModel folder or a `.tflite` file,
    run in its format's runtime. The image size is the model's input size (pos_embed is
    resized to it if needed); the head is the one the model ends in.
    """
    device = resolve_device(options.device)
    _notify(on_stage, "loading")
    fmt = artifact_format(model_path)
    model = load_artifact(model_path, fmt)
    image_size = model.input_shape[1]
    if options.image_size is not None and options.image_size != image_size:
        raise ConversionError(
            f"{model_path}: the model takes {image_size}px images, but --image-size "
            f"{options.image_size} was given"
        )
    checkpoint = load_checkpoint(
        checkpoint_path, dataclasses.replace(options, image_size=image_size)
    )
    with about(model_path):
        head = _artifact_head(model, checkpoint.config, options.head)
    contract = input_contract(model)
    if options.input is not None and options.input != contract.kind:
        raise ConversionError(
            f"{model_path}: the model takes {contract.kind}, but --input {options.input} was given"
        )
    if head == "features":
        expected_outputs, meaning = checkpoint.config.embed_dims[-1], "feature channels"
    else:
        expected_outputs, meaning = checkpoint.config.num_classes, "classes"
    if model.output_shape[-1] != expected_outputs:
        raise ConversionError(
            f"{model_path}: the model has {model.output_shape[-1]} outputs, but the checkpoint "
            f"has {expected_outputs} {meaning}"
        )
    result = ConversionResult(
        checkpoint=str(checkpoint_path),
        output=str(model_path),
        variant=checkpoint.config.name,
        image_size=checkpoint.image_size,
        num_classes=checkpoint.config.num_classes,
        parameters=checkpoint.parameter_count(head),
        head=head,
        output_format=fmt,
        runtime=runtime_name(fmt),
        tflite_dtype=weight_dtype(model) if fmt == "tflite" else None,
        input=contract.to_dict(),
    )
    pixels = _verification_pixels(options, checkpoint, weight_dtype(model))
    _verify(model, checkpoint, options, pixels, device, result, on_stage)
    return result
