"""The conversion pipeline: load, detect, build, port, save, verify, move into place."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from volo_convert.checkpoint import check_finite, load_state_dict, tensor_shapes
from volo_convert.errors import ConversionError
from volo_convert.keras_model import build_volo
from volo_convert.mapping import weight_mappings
from volo_convert.memory import MappedCheckpoint
from volo_convert.porting import port_weights
from volo_convert.resolution import resize_pos_embed
from volo_convert.saving import (
    check_output_path,
    load_model,
    output_format,
    save_model,
    staged_output,
)
from volo_convert.variants import VoloConfig, check_image_size, detect_config, get_variant
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
    """Everything a conversion can be told; the defaults are the CLI's."""

    variant: str | None = None
    image_size: int | None = None
    output_format: str | None = None
    atol: float = DEFAULT_ATOL
    device: str = "auto"
    verify: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    ema: bool = False
    trust_checkpoint: bool = False
    overwrite: bool = False


@dataclasses.dataclass
class ConversionResult:
    """What a conversion or a verification found, as written to reports."""

    checkpoint: str
    output: str
    variant: str
    image_size: int
    num_classes: int
    parameters: int
    convert_seconds: float | None = None
    verify_seconds: float | None = None
    parity: ParityResult | None = None

    @property
    def passed(self) -> bool:
        """True unless verification ran and failed."""
        return self.parity is None or self.parity.passed

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["parity"] = self.parity.to_dict() if self.parity else None
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


def load_checkpoint(path: str | Path, options: ConvertOptions) -> LoadedCheckpoint:
    """Reads a checkpoint, finds its architecture and resizes pos_embed if asked to.

    `options.variant` overrides the detected variant (keeping the checkpoint's class
    count); `options.image_size` converts to another input size.
    """
    state_dict = load_state_dict(path, ema=options.ema, trust_checkpoint=options.trust_checkpoint)
    config, image_size = detect_config(tensor_shapes(state_dict))
    if options.variant is not None:
        config = get_variant(options.variant).with_num_classes(config.num_classes)
    check_finite(state_dict, path)
    if options.image_size is not None and options.image_size != image_size:
        check_image_size(options.image_size)
        state_dict["pos_embed"] = resize_pos_embed(state_dict["pos_embed"], options.image_size)
        image_size = options.image_size
    return LoadedCheckpoint(state_dict, config, image_size)


def verify_model(model: Any, checkpoint: LoadedCheckpoint, options: ConvertOptions) -> ParityResult:
    """Parity of `model` against the reference built from `checkpoint`."""
    return check_parity(
        model,
        checkpoint.config,
        checkpoint.image_size,
        checkpoint.state_dict,
        atol=options.atol,
        device=options.device,
        batch_size=options.batch_size,
        seed=options.seed,
    )


def convert(
    checkpoint_path: str | Path,
    output_path: str | Path,
    options: ConvertOptions = ConvertOptions(),
    on_stage: StageCallback | None = None,
) -> ConversionResult:
    """Converts one checkpoint to a Keras file and, unless told not to, verifies it.

    The file is written beside `output_path` under a temporary name, reloaded and
    verified from disk, and only then moved into place. A failed verification leaves
    no file at `output_path` and returns a result whose `passed` is False.

    Args:
        checkpoint_path: the PyTorch checkpoint.
        output_path: where the Keras file goes; its extension picks the format.
        options: see `ConvertOptions`.
        on_stage: called with each stage's name as it starts.
    """
    output_path = Path(output_path)
    fmt = output_format(output_path, options.output_format)
    check_output_path(output_path, options.overwrite)
    if options.image_size is not None:
        check_image_size(options.image_size)
    if options.verify:
        resolve_device(options.device)

    started = time.perf_counter()
    _notify(on_stage, "loading")
    checkpoint = load_checkpoint(checkpoint_path, options)
    # Hand back each mapped tensor's pages once read, so the weights are held once, in Keras.
    mapped = MappedCheckpoint(checkpoint_path)
    mapped.release_all(checkpoint.state_dict.values())
    _notify(on_stage, "building")
    model = build_volo(checkpoint.config, checkpoint.image_size)
    _notify(on_stage, "porting")
    port_weights(
        model,
        checkpoint.state_dict,
        weight_mappings(checkpoint.config),
        on_tensor=lambda torch_key: mapped.release(checkpoint.state_dict[torch_key]),
    )
    result = ConversionResult(
        checkpoint=str(checkpoint_path),
        output=str(output_path),
        variant=checkpoint.config.name,
        image_size=checkpoint.image_size,
        num_classes=checkpoint.config.num_classes,
        parameters=int(model.count_params()),
    )
    with staged_output(output_path) as temp_path:
        _notify(on_stage, "saving")
        save_model(model, temp_path, fmt)
        del model
        result.convert_seconds = time.perf_counter() - started
        if options.verify:
            _notify(on_stage, "verifying")
            verify_started = time.perf_counter()
            result.parity = verify_model(load_model(temp_path), checkpoint, options)
            result.verify_seconds = time.perf_counter() - verify_started
        if result.passed:
            if output_path.exists() and not options.overwrite:
                raise ConversionError(
                    f"{output_path}: appeared while converting; pass --overwrite to replace it"
                )
            os.replace(temp_path, output_path)
    return result


def verify_file(
    keras_path: str | Path,
    checkpoint_path: str | Path,
    options: ConvertOptions = ConvertOptions(),
    on_stage: StageCallback | None = None,
) -> ConversionResult:
    """Verifies an existing Keras file against the checkpoint it was converted from.

    The image size is the Keras model's input size; pos_embed is resized to it if needed.
    """
    resolve_device(options.device)
    _notify(on_stage, "loading")
    model = load_model(keras_path)
    image_size = model.input_shape[1]
    if options.image_size is not None and options.image_size != image_size:
        raise ConversionError(
            f"{keras_path}: the model takes {image_size}px images, but --image-size "
            f"{options.image_size} was given"
        )
    checkpoint = load_checkpoint(
        checkpoint_path, dataclasses.replace(options, image_size=image_size)
    )
    if model.output_shape[-1] != checkpoint.config.num_classes:
        raise ConversionError(
            f"{keras_path}: the model has {model.output_shape[-1]} outputs, but the checkpoint "
            f"has {checkpoint.config.num_classes} classes"
        )
    _notify(on_stage, "verifying")
    started = time.perf_counter()
    parity = verify_model(model, checkpoint, options)
    return ConversionResult(
        checkpoint=str(checkpoint_path),
        output=str(keras_path),
        variant=checkpoint.config.name,
        image_size=checkpoint.image_size,
        num_classes=checkpoint.config.num_classes,
        parameters=int(model.count_params()),
        verify_seconds=time.perf_counter() - started,
        parity=parity,
    )
