"""The conversion pipeline: load, detect, build, port, save, verify, move into place."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import torch

from volo_convert.checkpoint import check_finite, load_state_dict, tensor_shapes
from volo_convert.diagnosis import Diagnosis, diagnose
from volo_convert.errors import ConversionError
from volo_convert.keras_model import build_volo, model_head
from volo_convert.mapping import weight_mappings
from volo_convert.memory import MappedCheckpoint
from volo_convert.porting import port_weights
from volo_convert.resolution import resize_pos_embed
from volo_convert.runtimes import (
    Predictor,
    TFLiteRunner,
    artifact_format,
    load_artifact,
    runtime_name,
)
from volo_convert.saving import (
    SAVEDMODEL,
    check_backend,
    check_output_path,
    move_into_place,
    output_format,
    save_model,
    staged_output,
)
from volo_convert.tflite import FLOAT16_ATOL, check_tflite_dtype
from volo_convert.variants import (
    DEFAULT_HEAD,
    VoloConfig,
    check_head,
    check_image_size,
    detect_config,
    get_variant,
)
from volo_convert.verification import (
    DEFAULT_ATOL,
    DEFAULT_BATCH_SIZE,
    ParityResult,
    check_parity,
    resolve_device,
)

StageCallback = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """Everything a conversion can be told; the defaults are the CLI's.

    `head` None means `full` for a conversion and, for a verification, the head the
    Keras file ends in. `explain` adds the per-stage diagnosis, which a failed parity
    check adds anyway.
    """

    variant: str | None = None
    image_size: int | None = None
    output_format: str | None = None
    tflite_dtype: str = "float32"
    atol: float | None = None  # None: DEFAULT_ATOL, or FLOAT16_ATOL for float16 TFLite
    device: str = "auto"
    verify: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    ema: bool = False
    trust_checkpoint: bool = False
    overwrite: bool = False
    head: str | None = None
    explain: bool = False


@dataclasses.dataclass
class ConversionResult:
    """What a conversion or a verification found, as written to reports."""

    checkpoint: str
    output: str
    variant: str
    image_size: int
    num_classes: int
    parameters: int
    head: str = DEFAULT_HEAD
    convert_seconds: float | None = None
    verify_seconds: float | None = None
    parity: ParityResult | None = None
    diagnosis: Diagnosis | None = None
    output_format: str | None = None
    runtime: str | None = None

    @property
    def passed(self) -> bool:
        """True unless verification ran and failed."""
        return self.parity is None or self.parity.passed

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["parity"] = self.parity.to_dict() if self.parity else None
        fields["diagnosis"] = self.diagnosis.to_dict() if self.diagnosis else None
        fields["status"] = (
            "unverified" if self.parity is None else ("passed" if self.passed else "failed")
        )
        return fields


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint's tensors and the architecture they fit, resized to `image_size`."""

    state_dict: dict[str, torch.Tensor]
    config: VoloConfig
    image_size: int


def _notify(on_stage: StageCallback | None, stage: str) -> None:
    if on_stage is not None:
        on_stage(stage)


def _check_tflite_dtype(fmt: str, tflite_dtype: str) -> None:
    check_tflite_dtype(tflite_dtype)
    if tflite_dtype != "float32" and fmt != "tflite":
        raise ConversionError(f"--tflite-dtype {tflite_dtype} applies to .tflite outputs only")


def _parameter_count(checkpoint: LoadedCheckpoint, head: str) -> int:
    """Weights of the model ending in `head`: the checkpoint tensors it keeps.

    The same figure as `keras.Model.count_params()`, for files that keep no such count.
    """
    return sum(
        checkpoint.state_dict[mapping.torch_key].numel()
        for mapping in weight_mappings(checkpoint.config, head)
        if mapping.keras_path is not None and mapping.torch_key in checkpoint.state_dict
    )


def load_checkpoint(path: str | Path, options: ConvertOptions) -> LoadedCheckpoint:
    """Reads a checkpoint, finds its architecture and resizes pos_embed if asked to.

    `options.variant` overrides the detected variant (keeping the checkpoint's class
    count); `options.image_size` converts to another input size.
    """
    state_dict = load_state_dict(path, ema=options.ema, trust_checkpoint=options.trust_checkpoint)
    try:
        config, image_size = detect_config(tensor_shapes(state_dict))
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from None
    if options.variant is not None:
        config = get_variant(options.variant).with_num_classes(config.num_classes)
    check_finite(state_dict, path)
    if options.image_size is not None and options.image_size != image_size:
        check_image_size(options.image_size)
        state_dict["pos_embed"] = resize_pos_embed(state_dict["pos_embed"], options.image_size)
        image_size = options.image_size
    return LoadedCheckpoint(state_dict, config, image_size)


def default_atol(weight_dtype: str) -> float:
    """The tolerance when none is given: looser for float16 weights."""
    return FLOAT16_ATOL if weight_dtype == "float16" else DEFAULT_ATOL


def _atol(model: Predictor, options: ConvertOptions) -> float:
    weight_dtype = model.weight_dtype if isinstance(model, TFLiteRunner) else "float32"
    return default_atol(weight_dtype) if options.atol is None else options.atol


def verify_model(
    model: Predictor,
    checkpoint: LoadedCheckpoint,
    options: ConvertOptions,
    head: str = DEFAULT_HEAD,
) -> ParityResult:
    """Parity of `model` (a Keras model or a runner), ending in `head`, against the
    reference built from `checkpoint`."""
    return check_parity(
        model,
        checkpoint.config,
        checkpoint.image_size,
        checkpoint.state_dict,
        atol=_atol(model, options),
        device=options.device,
        batch_size=options.batch_size,
        seed=options.seed,
        head=head,
    )


def _keras_graph(model: Predictor, checkpoint: LoadedCheckpoint, head: str) -> keras.Model:
    """`model` itself if it is Keras; else the Keras graph a SavedModel/TFLite came from."""
    if isinstance(model, keras.Model):
        return model
    rebuilt = build_volo(checkpoint.config, checkpoint.image_size, head)
    port_weights(rebuilt, checkpoint.state_dict, weight_mappings(checkpoint.config, head))
    return rebuilt


def diagnose_model(
    model: Predictor,
    checkpoint: LoadedCheckpoint,
    options: ConvertOptions,
    head: str = DEFAULT_HEAD,
) -> Diagnosis:
    """Per-stage differences from the reference, on the parity check's images.

    A SavedModel or TFLite file has no stage outputs to read, so the Keras graph it was
    exported from is diagnosed; if every stage of that passes, the export lost the parity.
    """
    return diagnose(
        _keras_graph(model, checkpoint, head),
        checkpoint.config,
        checkpoint.image_size,
        checkpoint.state_dict,
        head=head,
        atol=_atol(model, options),
        device=options.device,
        batch_size=options.batch_size,
        seed=options.seed,
    )


def _check_and_explain(
    model: Predictor,
    checkpoint: LoadedCheckpoint,
    options: ConvertOptions,
    result: ConversionResult,
    on_stage: StageCallback | None,
) -> None:
    """Fills in `result`'s parity and timing, and its diagnosis if asked for or failed."""
    _notify(on_stage, "verifying")
    started = time.perf_counter()
    result.parity = verify_model(model, checkpoint, options, result.head)
    result.verify_seconds = time.perf_counter() - started
    if options.explain or not result.parity.passed:
        _notify(on_stage, "diagnosing")
        result.diagnosis = diagnose_model(model, checkpoint, options, result.head)


def convert(
    checkpoint_path: str | Path,
    output_path: str | Path,
    options: ConvertOptions = ConvertOptions(),
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
    _check_tflite_dtype(fmt, options.tflite_dtype)
    check_backend(fmt)
    check_output_path(output_path, options.overwrite, folder=fmt == SAVEDMODEL)
    if options.image_size is not None:
        check_image_size(options.image_size)
    head = options.head or DEFAULT_HEAD
    check_head(head)
    if options.explain and not options.verify:
        raise ConversionError("--explain compares with PyTorch, so it needs verification")
    if options.verify:
        resolve_device(options.device)

    started = time.perf_counter()
    _notify(on_stage, "loading")
    checkpoint = load_checkpoint(checkpoint_path, options)
    # Hand back each mapped tensor's pages once read, so the weights are held once, in Keras.
    mapped = MappedCheckpoint(checkpoint_path)
    mapped.release_all(checkpoint.state_dict.values())
    _notify(on_stage, "building")
    model = build_volo(checkpoint.config, checkpoint.image_size, head)
    _notify(on_stage, "porting")
    try:
        port_weights(
            model,
            checkpoint.state_dict,
            weight_mappings(checkpoint.config, head),
            on_tensor=lambda torch_key: mapped.release(checkpoint.state_dict[torch_key]),
        )
    except ConversionError as error:
        raise ConversionError(f"{checkpoint_path}: {error}") from None
    result = ConversionResult(
        checkpoint=str(checkpoint_path),
        output=str(output_path),
        variant=checkpoint.config.name,
        image_size=checkpoint.image_size,
        num_classes=checkpoint.config.num_classes,
        parameters=int(model.count_params()),
        head=head,
        output_format=fmt,
        runtime=runtime_name(fmt) if options.verify else None,
    )
    with staged_output(output_path, folder=fmt == SAVEDMODEL) as temp_path:
        _notify(on_stage, "saving")
        try:
            save_model(model, temp_path, fmt, options.tflite_dtype)
        except OSError as error:
            raise ConversionError(
                f"{output_path}: could not write the "
                f"{'SavedModel folder' if fmt == SAVEDMODEL else f'{fmt} file'} "
                f"({error.strerror or error})"
            ) from None
        del model
        result.convert_seconds = time.perf_counter() - started
        if options.verify:
            artifact = load_artifact(temp_path, fmt)
            _check_and_explain(artifact, checkpoint, options, result, on_stage)
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
    options: ConvertOptions = ConvertOptions(),
    on_stage: StageCallback | None = None,
) -> ConversionResult:
    """Verifies an existing model against the checkpoint it was converted from.

    `model_path` is a `.h5` or `.keras` file, a SavedModel folder or a `.tflite` file,
    run in its format's runtime. The image size is the model's input size (pos_embed is
    resized to it if needed); the head is the one the model ends in.
    """
    resolve_device(options.device)
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
    try:
        head = _artifact_head(model, checkpoint.config, options.head)
    except ConversionError as error:
        raise ConversionError(f"{model_path}: {error}") from None
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
        parameters=_parameter_count(checkpoint, head),
        head=head,
        output_format=fmt,
        runtime=runtime_name(fmt),
    )
    _check_and_explain(model, checkpoint, options, result, on_stage)
    return result
