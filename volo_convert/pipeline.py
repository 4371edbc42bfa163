"""The conversion pipeline: load, detect, build, port, save, verify, move into place."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import torch

from volo_convert import __version__
from volo_convert.architecture.keras_model import build_skeleton, build_volo, model_head
from volo_convert.architecture.variants import VoloConfig
from volo_convert.checks.diagnosis import diagnose
from volo_convert.checks.images import normalize
from volo_convert.checks.parity import check_parity
from volo_convert.checks.photos import calibration_pixels, verification_pixels
from volo_convert.checks.reference import (
    reference_memory_bytes,
    resolve_device,
    run_reference,
)
from volo_convert.checks.training import check_training_parity
from volo_convert.environment import GIGABYTE, available_memory_bytes, environment
from volo_convert.errors import ConversionError, about, os_error_reason
from volo_convert.formats import (
    SKELETON_FORMATS,
    STAGING_SUFFIXES,
    Predictor,
    artifact_format,
    check_backend,
    compute_dtype,
    input_contract,
    load_artifact,
    output_format,
    precision,
    read_provenance,
    runtime_name,
    save_model,
    weight_dtype,
    write_provenance,
)
from volo_convert.formats.contract import InputContract
from volo_convert.options import (
    DEFAULT_ATOL,
    DEFAULT_COMPUTE_DTYPE,
    DEFAULT_CONVERT_OPTIONS,
    DEFAULT_HEAD,
    KERAS_FORMATS,
    SAVEDMODEL,
    TFLITE_DTYPES,
    ConvertOptions,
    default_atol,
    default_min_top1,
    default_verify_images,
    file_precision,
)
from volo_convert.paths import check_output_path, move_into_place, staged_output
from volo_convert.provenance import Provenance, VerificationRecord
from volo_convert.results import ConversionResult, write_report
from volo_convert.signals import pause_if_asked
from volo_convert.weights.loading import LoadedCheckpoint, load_checkpoint
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import (
    assign_weights,
    port_weights,
    ported_weights,
    variable_shapes,
)

StageCallback = Callable[[str], None]
WarningCallback = Callable[[str], None]


def _collecting(warnings: list[str], on_warning: WarningCallback | None) -> WarningCallback:
    """A warning callback that keeps each warning in `warnings` and passes it on."""

    def warn(message: str) -> None:
        warnings.append(message)
        if on_warning is not None:
            on_warning(message)

    return warn


def _notify(on_stage: StageCallback | None, stage: str) -> None:
    if on_stage is not None:
        on_stage(stage)
    pause_if_asked(stage)


def _check_trainable(fmt: str, options: ConvertOptions) -> None:
    """Refuses the training check for a format Keras cannot train."""
    if options.training and fmt not in KERAS_FORMATS:
        raise ConversionError(
            f"--training trains the model in Keras, so it needs a .h5 or .keras file, not {fmt}"
        )


def _keras_graph(model: Predictor, checkpoint: LoadedCheckpoint, head: str) -> keras.Model:
    """`model` itself if it is a float32 Keras model; else the float32 Keras graph a
    SavedModel, a TFLite file or a bfloat16 model came from."""
    if isinstance(model, keras.Model) and compute_dtype(model) == DEFAULT_COMPUTE_DTYPE:
        return model
    rebuilt = build_volo(
        checkpoint.config, checkpoint.image_size, head, input_kind=input_contract(model).kind
    )
    port_weights(rebuilt, checkpoint.state_dict, weight_mappings(checkpoint.config, head))
    return rebuilt


def _verification_images(
    options: ConvertOptions, checkpoint: LoadedCheckpoint, file_kind: str, warn: WarningCallback
) -> np.ndarray | None:
    """The photos of `--images` to verify a file of precision `file_kind` on, or None for
    synthetic images.

    The memory the verification needs is checked here, once the image count is known.
    """
    size, variant = checkpoint.image_size, checkpoint.config.name
    pixels = verification_pixels(options.images, size, variant, warn, file_kind)
    count = len(pixels) if pixels is not None else _synthetic_image_count(options, file_kind)
    _check_memory(checkpoint, count)
    return pixels


def _synthetic_image_count(options: ConvertOptions, file_kind: str) -> int:
    return options.verify_images or default_verify_images(file_kind)


def _calibration_inputs(
    options: ConvertOptions, checkpoint: LoadedCheckpoint, warn: WarningCallback
) -> np.ndarray | None:
    """What an int8 file is calibrated on, as the model takes it; None for other files."""
    if options.tflite_dtype != "int8":
        return None
    size, variant = checkpoint.image_size, checkpoint.config.name
    pixels = calibration_pixels(options.calibration_images, size, variant, warn)
    return pixels.astype(np.float32) if options.output_input == "pixels" else normalize(pixels)


def _verify(
    model: Predictor,
    checkpoint: LoadedCheckpoint,
    options: ConvertOptions,
    pixels: np.ndarray | None,
    device: torch.device,
    result: ConversionResult,
    on_stage: StageCallback | None,
) -> None:
    """Fills in `result`'s parity and timing, its diagnosis if asked for or failed, and
    the training check if asked for.

    The reference runs once, on `pixels` (photos) or else the seeded synthetic images;
    parity and diagnosis both read that run. A SavedModel or TFLite file has no stage
    outputs to read, and a bfloat16 model's would all miss an atol, so the float32 Keras
    graph it came from is diagnosed (against DEFAULT_ATOL where the file has no atol
    bar): if every stage of that passes, the export or the precision lost the parity. The
    training check takes one stateless training step of the Keras `model` beside a fresh
    reference.
    """
    _notify(on_stage, "verifying")
    started = time.perf_counter()
    dtype = precision(model)
    reference = run_reference(
        checkpoint.config,
        checkpoint.image_size,
        checkpoint.state_dict,
        head=result.head,
        device=device,
        pixels=pixels,
        batch_size=_synthetic_image_count(options, dtype),
        seed=options.seed,
    )
    atol = default_atol(dtype) if options.atol is None else options.atol
    min_top1 = default_min_top1(dtype) if options.min_top1 is None else options.min_top1
    result.parity = check_parity(model, reference, atol, min_top1)
    result.verify_seconds = time.perf_counter() - started
    diagnosis_atol = DEFAULT_ATOL if atol is None else atol
    if options.explain or not result.parity.passed:
        _notify(on_stage, "diagnosing")
        graph = _keras_graph(model, checkpoint, result.head)
        result.diagnosis = diagnose(graph, checkpoint.config, reference, diagnosis_atol)
    if options.training:
        _notify(on_stage, "training")
        result.training = check_training_parity(
            model,
            checkpoint.config,
            checkpoint.state_dict,
            atol=diagnosis_atol,
            batch_size=_synthetic_image_count(options, dtype),
            seed=options.seed,
            device=device,
        )


def _build_and_port(
    checkpoint_path: str | Path,
    checkpoint: LoadedCheckpoint,
    options: ConvertOptions,
    fmt: str,
    on_stage: StageCallback | None,
) -> tuple[keras.Model, Iterator[tuple[str, np.ndarray]] | None]:
    """The Keras model, and for SKELETON_FORMATS the weights still to be written.

    For those formats the model is a skeleton and the weights come lazily, one tensor at
    a time, as the file is written; for the others they are assigned here. Either way
    each tensor's pages are handed back once it is moved, so the weights are held once.
    """
    head = options.output_head
    _notify(on_stage, "building")
    release = checkpoint.mapped.release
    build = build_skeleton if fmt in SKELETON_FORMATS else build_volo
    model = build(
        checkpoint.config,
        checkpoint.image_size,
        head,
        options.drop_path_rate,
        options.drop_rate,
        options.output_input,
        options.output_compute_dtype,
    )
    with about(checkpoint_path):
        weights = ported_weights(
            variable_shapes(model),
            checkpoint.state_dict,
            weight_mappings(checkpoint.config, head),
            on_tensor=lambda torch_key: release(checkpoint.state_dict[torch_key]),
        )
    if fmt in SKELETON_FORMATS:
        return model, weights
    _notify(on_stage, "porting")
    assign_weights(model, weights)
    return model, None


@contextlib.contextmanager
def _writing_staged(temp_path: Path, output_path: Path, what: str) -> Iterator[None]:
    """A write into the staged file or folder whose failure names the user's path, in one
    line, never the temporary one."""
    try:
        with about(output_path):
            yield
    except OSError as error:
        reason = os_error_reason(error).replace(str(temp_path), str(output_path))
        raise ConversionError(f"{output_path}: could not {what} ({reason})") from None


def _save(
    model: keras.Model,
    weights: Iterator[tuple[str, np.ndarray]] | None,
    temp_path: Path,
    output_path: Path,
    fmt: str,
    options: ConvertOptions,
    calibration: np.ndarray | None,
) -> None:
    """Writes the staged file, from `weights` when given (`model` is then a skeleton); an
    int8 TFLite file is calibrated on `calibration`."""
    written = "SavedModel folder" if fmt == SAVEDMODEL else f"{fmt} file"
    with _writing_staged(temp_path, output_path, f"write the {written}"):
        save_model(
            model, temp_path, fmt, options.tflite_dtype, options.tflite_io, calibration, weights
        )


def _check_outputs(
    output_path: Path | None,
    report_path: Path | None,
    inputs: list[Path],
    options: ConvertOptions,
    fmt: str | None = None,
) -> None:
    """The output policy for the model file and the report, before any work."""
    if output_path is not None:
        check_output_path(output_path, options.overwrite, folder=fmt == SAVEDMODEL, inputs=inputs)
    if report_path is not None:
        others = [] if output_path is None else [output_path]
        check_output_path(report_path, options.overwrite, inputs=inputs, others=others)


def _check_memory(checkpoint: LoadedCheckpoint, image_count: int) -> None:
    """Refuses a verification batch the machine's available memory cannot hold."""
    needed = reference_memory_bytes(checkpoint.config, checkpoint.image_size, image_count)
    available = available_memory_bytes()
    if needed > available:
        raise ConversionError(
            f"verifying {image_count} images at {checkpoint.image_size}px needs about "
            f"{needed / GIGABYTE:,.1f} GB, but this machine has {available / GIGABYTE:,.1f} GB "
            "available; use fewer --verify-images or a smaller --image-size"
        )


def _write_report(report_path: Path | None, result: ConversionResult) -> None:
    if report_path is not None:
        write_report(report_path, result)


def _provenance(
    result: ConversionResult, checkpoint: LoadedCheckpoint, options: ConvertOptions
) -> Provenance:
    """What the output records about itself, once verified (or not, with `--no-verify`)."""
    parity = result.parity
    verification = None
    if parity is not None and result.runtime is not None and result.verify_seconds is not None:
        verification = VerificationRecord(
            max_abs_diff=parity.max_abs_diff,
            mean_abs_diff=parity.mean_abs_diff,
            max_rel_diff=parity.max_rel_diff,
            top1_agreement=parity.top1_agreement,
            atol=parity.atol,
            min_top1=parity.min_top1,
            images=parity.batch_size,
            seed=options.seed,
            device=parity.device,
            runtime=result.runtime,
            seconds=round(result.verify_seconds, 1),
        )
    return Provenance(
        converter_version=__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        source_file=Path(result.checkpoint).name,
        source_sha256=checkpoint.sha256,
        variant=result.variant,
        image_size=result.image_size,
        head=result.head,
        num_classes=result.num_classes,
        output_format=str(result.output_format),
        tflite_dtype=result.tflite_dtype,
        input=result.input,
        compute_dtype=result.compute_dtype,
        verification=verification,
        environment=environment(),
    )


def _record_provenance(
    temp_path: Path, output_path: Path, fmt: str, provenance: Provenance
) -> None:
    """Writes the provenance into the staged file."""
    with _writing_staged(temp_path, output_path, "record the provenance"):
        write_provenance(temp_path, fmt, provenance)


def convert(
    checkpoint_path: str | Path,
    output_path: str | Path,
    options: ConvertOptions = DEFAULT_CONVERT_OPTIONS,
    on_stage: StageCallback | None = None,
    report_path: str | Path | None = None,
    on_warning: WarningCallback | None = None,
) -> ConversionResult:
    """Converts one checkpoint to a model file and, unless told not to, verifies it.

    The file (or SavedModel folder) is written beside `output_path` under a temporary
    name, reloaded and verified from disk in its format's runtime, given its provenance
    record (source, model, verification figures, versions), and only then moved into
    place. A failed verification leaves nothing at `output_path` and returns a result
    whose `passed` is False (with a per-stage diagnosis).

    Args:
        checkpoint_path: the PyTorch checkpoint.
        output_path: where the model goes; its extension picks the format (`.h5`,
            `.keras`, `.tflite`, none for a SavedModel folder) unless the options name one.
        options: see `ConvertOptions`.
        on_stage: called with each stage's name as it starts.
        report_path: where to write the figures as JSON (an output like the model).
        on_warning: called with each warning (one line) as it arises.
    """
    warnings: list[str] = []
    warn = _collecting(warnings, on_warning)
    output_path = Path(output_path)
    report_path = None if report_path is None else Path(report_path)
    fmt = output_format(output_path, options.output_format)
    if options.tflite_dtype != TFLITE_DTYPES[0] and fmt != "tflite":
        raise ConversionError(
            f"--tflite-dtype {options.tflite_dtype} applies to .tflite outputs only"
        )
    if options.output_compute_dtype != DEFAULT_COMPUTE_DTYPE and fmt == "tflite":
        raise ConversionError(
            f"--compute-dtype {options.output_compute_dtype} applies to Keras files and "
            "SavedModels, not .tflite; use --tflite-dtype for a smaller TFLite file"
        )
    check_backend(fmt)
    _check_trainable(fmt, options)
    _check_outputs(output_path, report_path, [Path(checkpoint_path)], options, fmt)
    device = resolve_device(options.device) if options.verify else None

    started = time.perf_counter()
    _notify(on_stage, "loading")
    checkpoint = load_checkpoint(checkpoint_path, options)
    file_kind = file_precision(options.tflite_dtype, options.output_compute_dtype)
    pixels = _verification_images(options, checkpoint, file_kind, warn) if device else None
    calibration = _calibration_inputs(options, checkpoint, warn)
    model, weights = _build_and_port(checkpoint_path, checkpoint, options, fmt, on_stage)
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
        checkpoint_sha256=checkpoint.sha256,
        warnings=warnings,
        tflite_dtype=options.tflite_dtype if fmt == "tflite" else None,
        input=InputContract(options.output_input).to_dict(),
        compute_dtype=options.output_compute_dtype,
    )
    staging_suffix = STAGING_SUFFIXES.get(fmt, "")
    with staged_output(output_path, folder=fmt == SAVEDMODEL, suffix=staging_suffix) as temp_path:
        _notify(on_stage, "saving")
        _save(model, weights, temp_path, output_path, fmt, options, calibration)
        del model, weights
        result.convert_seconds = time.perf_counter() - started
        if device is not None or fmt == "tflite":  # a TFLite input's scale is in the file
            _notify(on_stage, "reloading")
            reloaded = load_artifact(temp_path, fmt)
            result.input = input_contract(reloaded).to_dict()
            if device is not None:
                _verify(reloaded, checkpoint, options, pixels, device, result, on_stage)
            del reloaded
        if result.passed:
            _notify(on_stage, "recording")
            provenance = _provenance(result, checkpoint, options)
            _record_provenance(temp_path, output_path, fmt, provenance)
            if output_path.exists() and not options.overwrite:
                raise ConversionError(
                    f"{output_path}: appeared while converting; pass --overwrite to replace it"
                )
            move_into_place(temp_path, output_path)
    _write_report(report_path, result)
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


def _recorded_sha256(model_path: str | Path, warn: WarningCallback) -> str | None:
    """The SHA-256 of the checkpoint the model records it came from, if it records one."""
    try:
        provenance = read_provenance(model_path)
    except ConversionError as error:
        warn(f"{error}; verifying anyway")
        return None
    return None if provenance is None else provenance.source_sha256


def verify_file(
    model_path: str | Path,
    checkpoint_path: str | Path,
    options: ConvertOptions = DEFAULT_CONVERT_OPTIONS,
    on_stage: StageCallback | None = None,
    report_path: str | Path | None = None,
    on_warning: WarningCallback | None = None,
) -> ConversionResult:
    """Verifies an existing model against the checkpoint it was converted from.

    `model_path` is a `.h5` or `.keras` file, a SavedModel folder or a `.tflite` file,
    run in its format's runtime. The image size is the model's input size (pos_embed is
    resized to it if needed); the head is the one the model ends in. A checkpoint whose
    SHA-256 differs from the one the model records is verified all the same, after a
    warning; the warnings are also kept in the result.

    Args:
        on_stage: called with each stage's name as it starts.
        on_warning: called with each warning (one line) as it arises.
    """
    warnings: list[str] = []
    warn = _collecting(warnings, on_warning)
    report_path = None if report_path is None else Path(report_path)
    fmt = artifact_format(model_path)
    _check_outputs(None, report_path, [Path(model_path), Path(checkpoint_path)], options)
    _check_trainable(fmt, options)
    device = resolve_device(options.device)
    _notify(on_stage, "loading")
    recorded_sha256 = _recorded_sha256(model_path, warn)
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
    if recorded_sha256 is not None and recorded_sha256 != checkpoint.sha256:
        warn(
            f"{checkpoint_path} is not the checkpoint {model_path} was converted from "
            f"(SHA-256 {checkpoint.sha256[:12]}, recorded {recorded_sha256[:12]}); "
            "verifying anyway"
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
    file_compute_dtype = compute_dtype(model)
    if options.compute_dtype is not None and options.compute_dtype != file_compute_dtype:
        raise ConversionError(
            f"{model_path}: the model computes in {file_compute_dtype}, but --compute-dtype "
            f"{options.compute_dtype} was given"
        )
    options.check_precision(precision(model), head)
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
        checkpoint_sha256=checkpoint.sha256,
        recorded_sha256=recorded_sha256,
        warnings=warnings,
        tflite_dtype=weight_dtype(model) if fmt == "tflite" else None,
        input=contract.to_dict(),
        compute_dtype=file_compute_dtype,
    )
    pixels = _verification_images(options, checkpoint, precision(model), warn)
    _verify(model, checkpoint, options, pixels, device, result, on_stage)
    _write_report(report_path, result)
    return result
