"""`convert`: a checkpoint becomes a file, written under a temporary name, reloaded and
verified from disk, given its provenance record, and only then moved into place."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

from volo_convert.architecture.keras_model import build_volo, skeleton_scope
from volo_convert.checks.images import normalize
from volo_convert.checks.photos import calibration_pixels
from volo_convert.checks.reference import resolve_device
from volo_convert.errors import ConversionError, about, os_error_reason
from volo_convert.formats import (
    SKELETON_FORMATS,
    STAGING_SUFFIXES,
    check_backend,
    input_contract,
    load_artifact,
    output_format,
    runtime_name,
    save_model,
    write_provenance,
)
from volo_convert.formats.contract import InputContract
from volo_convert.formats.tflite import TFLiteRunner
from volo_convert.options import (
    DEFAULT_CONVERT_OPTIONS,
    SAVEDMODEL,
    ConvertOptions,
    file_precision,
)
from volo_convert.paths import move_into_place, staged_output
from volo_convert.pipeline.stages import (
    StageCallback,
    WarningCallback,
    check_outputs,
    check_trainable,
    collecting,
    finish_report,
    notify,
)
from volo_convert.pipeline.verification import verification_images, verify
from volo_convert.results import ConversionResult
from volo_convert.weights.hub_folder import input_files
from volo_convert.weights.loading import LoadedCheckpoint, load_checkpoint
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import assign_weights, ported_weights, variable_shapes


def _check_format_options(fmt: str, options: ConvertOptions) -> None:
    """Refuses the options that do not apply to the output format."""
    options.check_format(fmt)
    check_backend(fmt)
    check_trainable(fmt, options)


def _calibration_inputs(
    options: ConvertOptions, checkpoint: LoadedCheckpoint, warn: WarningCallback
) -> np.ndarray | None:
    """What an int8 file is calibrated on, as the model takes it; None for other files."""
    if options.tflite_dtype != "int8":
        return None
    size, transform = checkpoint.image_size, checkpoint.transform
    pixels = calibration_pixels(options.calibration_images, size, transform, warn)
    return pixels.astype(np.float32) if options.output_input == "pixels" else normalize(pixels)


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
    notify(on_stage, "building")
    release = checkpoint.mapped.release
    skeleton = fmt in SKELETON_FORMATS
    with skeleton_scope() if skeleton else contextlib.nullcontext():
        model = build_volo(
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
    if skeleton:
        return model, weights
    notify(on_stage, "porting")
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


def _delegates(runner: TFLiteRunner, output_path: Path, options: ConvertOptions) -> dict[str, Any]:
    """The staged TFLite file's delegate report; refused, if asked, where the GPU delegate
    could not run it."""
    report = runner.delegate_report()
    if options.require_gpu_compatible and not report.gpu_compatible:
        flagged = "; ".join(report.gpu_flagged) or "the model analyzer does not pass it"
        raise ConversionError(
            f"{output_path}: the TFLite file is not GPU-delegate compatible "
            f"(--require-gpu-compatible): {flagged}"
        )
    return report.to_dict()


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
    warn = collecting(warnings, on_warning)
    output_path = Path(output_path)
    report_path = None if report_path is None else Path(report_path)
    fmt = output_format(output_path, options.output_format)
    _check_format_options(fmt, options)
    check_outputs(output_path, report_path, input_files(checkpoint_path), options, fmt)
    device = resolve_device(options.device) if options.verify else None

    started = time.perf_counter()
    notify(on_stage, "loading")
    checkpoint = load_checkpoint(checkpoint_path, options)
    file_kind = file_precision(options.tflite_dtype, options.output_compute_dtype)
    photos = verification_images(options, checkpoint, file_kind, warn) if device else None
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
        checkpoint_name=checkpoint.source_name,
        labels=checkpoint.labels,
        label_descriptions=checkpoint.label_descriptions,
        transform=dataclasses.asdict(checkpoint.transform),
        warnings=warnings,
        tflite_dtype=options.tflite_dtype if fmt == "tflite" else None,
        tflite_batch=options.tflite_batch if fmt == "tflite" else None,
        input=InputContract(options.output_input).to_dict(),
        compute_dtype=options.output_compute_dtype,
    )
    staging_suffix = STAGING_SUFFIXES.get(fmt, "")
    with staged_output(output_path, folder=fmt == SAVEDMODEL, suffix=staging_suffix) as temp_path:
        notify(on_stage, "saving")
        written = "SavedModel folder" if fmt == SAVEDMODEL else f"{fmt} file"
        with _writing_staged(temp_path, output_path, f"write the {written}"):
            save_model(
                model,
                temp_path,
                fmt,
                options.tflite_dtype,
                options.tflite_io,
                calibration,
                weights,
                options.tflite_batch,
            )
        del model, weights
        result.convert_seconds = time.perf_counter() - started
        if device is not None or fmt == "tflite":  # a TFLite input's scale is in the file
            notify(on_stage, "reloading")
            reloaded = load_artifact(temp_path, fmt)
            result.input = input_contract(reloaded).to_dict()
            if fmt == "tflite":
                result.delegates = _delegates(reloaded, output_path, options)
            if device is not None:
                verify(reloaded, checkpoint, options, photos, device, result, on_stage)
            del reloaded
        if result.passed:
            notify(on_stage, "recording")
            with _writing_staged(temp_path, output_path, "record the provenance"):
                write_provenance(temp_path, fmt, result.provenance(options.seed))
            if output_path.exists() and not options.overwrite:
                raise ConversionError(
                    f"{output_path}: appeared while converting; pass --overwrite to replace it"
                )
            move_into_place(temp_path, output_path)
    finish_report(report_path, result)
    return result
