"""`verify_file`: a file converted earlier, checked against the checkpoint it came from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras

from volo_convert.architecture.keras_model import model_head
from volo_convert.architecture.variants import VoloConfig
from volo_convert.checks.reference import resolve_device
from volo_convert.errors import ConversionError, about
from volo_convert.formats import (
    Predictor,
    artifact_format,
    compute_dtype,
    input_contract,
    load_artifact,
    precision,
    read_provenance,
    runtime_name,
    tflite_batch,
    weight_dtype,
)
from volo_convert.options import DEFAULT_CONVERT_OPTIONS, DEFAULT_HEAD, ConvertOptions
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
from volo_convert.provenance import Provenance
from volo_convert.results import ConversionResult
from volo_convert.weights.hub_folder import checkpoint_source, input_files
from volo_convert.weights.loading import load_checkpoint


def _artifact_head(
    model: Predictor, config: VoloConfig, requested: str | None, recorded: str | None
) -> str:
    """The head `model` ends in: read from a Keras graph, else from the provenance record,
    else from the output width.

    A SavedModel or TFLite file keeps no layer names, and `full` and `cls` have the same
    width, so a file without a record must be given `--head cls`; `features` shows in the
    width.
    """
    if isinstance(model, keras.Model):
        head = model_head(model)
    elif recorded is not None:
        head = recorded
    elif model.output_shape[-1] == config.embed_dims[-1] != config.num_classes:
        head = "features"
    else:
        head = requested or DEFAULT_HEAD
    if requested is not None and requested != head:
        raise ConversionError(
            f"the model ends in the {head} head, but --head {requested} was given"
        )
    return head


def _recorded_provenance(model_path: str | Path, warn: WarningCallback) -> Provenance | None:
    """The provenance record the model holds, if it holds a readable one."""
    try:
        return read_provenance(model_path)
    except ConversionError as error:
        warn(f"{error}; verifying anyway")
        return None


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
    warn = collecting(warnings, on_warning)
    report_path = None if report_path is None else Path(report_path)
    fmt = artifact_format(model_path)
    checkpoint_source(checkpoint_path)  # both inputs before any work
    check_outputs(None, report_path, [Path(model_path), *input_files(checkpoint_path)], options)
    check_trainable(fmt, options)
    device = resolve_device(options.device)
    notify(on_stage, "loading")
    provenance = _recorded_provenance(model_path, warn)
    recorded_sha256 = None if provenance is None else provenance.source_sha256
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
        head = _artifact_head(
            model, checkpoint.config, options.head, None if provenance is None else provenance.head
        )
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
        tflite_batch=tflite_batch(model),
        delegates=model.delegate_report().to_dict() if fmt == "tflite" else None,
        input=contract.to_dict(),
        compute_dtype=file_compute_dtype,
    )
    photos = verification_images(options, checkpoint, precision(model), warn)
    verify(model, checkpoint, options, photos, device, result, on_stage)
    finish_report(report_path, result)
    return result
