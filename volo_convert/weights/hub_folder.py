"""Hugging Face hub folders: timm's `config.json` beside `model.safetensors` or
`pytorch_model.bin`, as `timm.models.push_to_hf_hub` writes them and the hub keeps them.

The config is read as timm reads it (`timm.models._hub._parse_model_cfg`): the model's
`architecture`, `num_classes` (the top level wins over `pretrained_cfg`), and
`pretrained_cfg`'s `input_size` (`model_args.img_size` wins, VOLO's input size being
fixed), `crop_pct`, `crop_mode`, `interpolation`, `mean` and `std`, and the class names
(`label_names`, a list or an id -> name mapping, with `label_descriptions` by name). The
tensors stay the authority on shapes: what the config says is checked against them.

Torch-free, so the batch driver can find a folder's files without importing torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from volo_convert.architecture.variants import (
    CROP_MODES,
    CROP_PCT_RANGE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    VARIANTS,
    EvalTransform,
    VoloConfig,
    eval_transform,
)
from volo_convert.errors import ConversionError
from volo_convert.paths import check_input

CONFIG_NAME = "config.json"
# The weights files a hub folder may hold, in timm's order of preference: safetensors first.
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
_ARCHITECTURE = re.compile(r"^volo_(\w+?)(?:_\d+)?$")  # timm's names: volo_d1_224, volo_d5_512
_NORMALISATION_TOLERANCE = 1e-6  # mean/std as JSON round-trips them


class CheckpointSource(NamedTuple):
    """The files a checkpoint path stands for: the weights, and a hub folder's config.

    `name` is what the provenance records as the source: the file's name, or for a hub
    folder `FOLDER/WEIGHTS` (the weights file, whose SHA-256 is recorded beside it).
    """

    weights: Path
    config: Path | None
    name: str


@dataclasses.dataclass(frozen=True)
class HubConfig:
    """What a hub folder's config.json says about the model it describes."""

    architecture: str  # timm's name, e.g. volo_d1_224
    variant: str  # d1 .. d5
    num_classes: int
    image_size: int | None  # None: the config names no input size
    transform_fields: dict[str, Any]  # the EvalTransform fields it names
    labels: tuple[str, ...] | None
    label_descriptions: tuple[str, ...] | None

    def transform(self, image_size: int) -> EvalTransform:
        """The eval transform at `image_size`: the config's fields, the release's for the rest."""
        return dataclasses.replace(
            eval_transform(self.variant, image_size), **self.transform_fields
        )


def is_hub_folder(path: Path) -> bool:
    """True for a folder holding config.json (a hub folder, complete or not)."""
    return path.is_dir() and os.path.lexists(path / CONFIG_NAME)


def input_files(path: str | Path) -> list[Path]:
    """`path`, and for a folder the hub files in it, for the output policy before any
    reading: an output may be none of them. Raises nothing; reading checks them."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return [
        path,
        *(path / name for name in (CONFIG_NAME, *WEIGHTS_NAMES) if (path / name).exists()),
    ]


def checkpoint_source(path: str | Path) -> CheckpointSource:
    """The files `path` names, each through the input policy (`paths.check_input`).

    A file is its own weights. A folder must hold config.json and one of WEIGHTS_NAMES
    (model.safetensors is read where both are); its files may be symbolic links, as in the
    hub's cache, if they lead to regular files.
    """
    path = check_input(path, folder_ok=True)
    if not path.is_dir():
        return CheckpointSource(path, None, path.name)
    held = [path / name for name in WEIGHTS_NAMES if os.path.lexists(path / name)]
    config = path / CONFIG_NAME
    if not held:
        found = "config.json but " if config.exists() else ""
        raise ConversionError(
            f"{path}: is a folder that holds {found}no {' or '.join(WEIGHTS_NAMES)}; expected "
            f"a checkpoint file or a hub folder ({CONFIG_NAME} beside the weights)"
        )
    weights = check_input(held[0])
    if not os.path.lexists(config):
        raise ConversionError(
            f"{path}: holds {weights.name} but no {CONFIG_NAME}, which names its architecture, "
            f"classes and preprocessing; name {weights} itself to convert it by its tensors alone"
        )
    check_input(config, what="a JSON file")
    return CheckpointSource(weights, config, f"{path.name}/{weights.name}")


_KINDS: dict[Any, str] = {
    str: "a name",
    int: "a whole number",
    (int, float): "a number",
    list: "a list",
    dict: "an object",
    (list, dict): "a list or an object",
}


def _field(document: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`document[key]` if it is of `kind` (None if absent); else a ConversionError."""
    value = document.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ConversionError(f"{where}: {key} is {json.dumps(value)}, which is not {_KINDS[kind]}")
    return value


def _image_size(pretrained: dict[str, Any], model_args: dict[str, Any], where: str) -> int | None:
    """The square input size the config names: model_args.img_size, else input_size."""
    size = _field(model_args, "img_size", (int, list), where)
    if size is not None:
        sizes, named = [size, size] if isinstance(size, int) else size, "model_args.img_size"
    else:
        input_size = _field(pretrained, "input_size", list, where)
        if input_size is None:
            return None
        if len(input_size) != 3 or input_size[0] != 3:
            raise ConversionError(
                f"{where}: pretrained_cfg.input_size is {json.dumps(input_size)}, expected "
                "[3, S, S] (RGB)"
            )
        sizes, named = input_size[1:], "pretrained_cfg.input_size"
    if (
        len(sizes) != 2
        or sizes[0] != sizes[1]
        or not all(
            isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in sizes
        )
    ):
        raise ConversionError(f"{where}: {named} is {json.dumps(size or sizes)}, expected a square")
    return sizes[0]


def _check_normalisation(pretrained: dict[str, Any], where: str) -> None:
    """Refuses a mean or std other than ImageNet's, the one the converted file can apply."""
    for key, imagenet in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        values = _field(pretrained, key, list, where)
        if values is None:
            continue
        if len(values) != 3 or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in values
        ):
            raise ConversionError(f"{where}: {key} is {json.dumps(values)}, expected 3 numbers")
        if any(
            abs(value - expected) > _NORMALISATION_TOLERANCE
            for value, expected in zip(values, imagenet, strict=True)
        ):
            raise ConversionError(
                f"{where}: {key} is {json.dumps(values)}, but volo-convert normalises with "
                f"ImageNet's {key} {json.dumps(list(imagenet))}, as VOLO was trained"
            )


def _transform_fields(pretrained: dict[str, Any], where: str) -> dict[str, Any]:
    """The eval transform's fields the config names (crop_pct, interpolation, crop_mode)."""
    fields = {
        "crop_pct": _field(pretrained, "crop_pct", (int, float), where),
        "interpolation": _field(pretrained, "interpolation", str, where),
        "crop_mode": _field(pretrained, "crop_mode", str, where),
    }
    crop_pct = fields["crop_pct"]
    low, high = CROP_PCT_RANGE
    if crop_pct is not None and not (math.isfinite(crop_pct) and low <= crop_pct <= high):
        raise ConversionError(f"{where}: crop_pct is {crop_pct}, expected {low} to {high}")
    for key, choices in (("interpolation", INTERPOLATIONS), ("crop_mode", CROP_MODES)):
        if fields[key] is not None and fields[key] not in choices:
            raise ConversionError(
                f"{where}: {key} is {fields[key]!r}, expected one of {', '.join(choices)}"
            )
    return {key: value for key, value in fields.items() if value is not None}


def _labels(
    names: list[Any] | dict[str, Any] | None,
    descriptions: dict[str, Any] | None,
    num_classes: int,
    where: str,
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """Class names by index (a mapping's gaps read as the index), and their descriptions."""
    if names is None:
        return None, None
    if isinstance(names, dict):
        try:
            by_index = {int(index): str(name) for index, name in names.items()}
        except ValueError:
            raise ConversionError(
                f"{where}: label_names maps keys that are not class ids"
            ) from None
        if any(index not in range(num_classes) for index in by_index):
            raise ConversionError(
                f"{where}: label_names names class ids outside 0..{num_classes - 1}"
            )
        names = [by_index.get(index, str(index)) for index in range(num_classes)]
    if len(names) != num_classes:
        raise ConversionError(
            f"{where}: label_names holds {len(names)} names, but num_classes is {num_classes}"
        )
    labels = tuple(str(name) for name in names)
    if not descriptions:
        return labels, None
    return labels, tuple(str(descriptions.get(name, name)) for name in labels)


def read_hub_config(path: Path) -> HubConfig:
    """Reads a hub folder's config.json as timm reads it; a ConversionError names the file."""
    where = str(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConversionError(f"{where}: is not UTF-8 text, expected timm's JSON config") from None
    except json.JSONDecodeError as error:
        raise ConversionError(
            f"{where}: is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    except OSError as error:
        raise ConversionError(f"{where}: cannot be read ({error.strerror})") from None
    if not isinstance(document, dict):
        raise ConversionError(f"{where}: holds {type(document).__name__}, expected a JSON object")
    if "pretrained_cfg" in document:
        pretrained = _field(document, "pretrained_cfg", dict, where) or {}
    else:  # timm's older single-dict layout
        pretrained = {**document, "label_names": document.get("labels")}
    architecture = _field(document, "architecture", str, where)
    if architecture is None:
        raise ConversionError(f"{where}: names no architecture (expected e.g. volo_d1_224)")
    match = _ARCHITECTURE.match(architecture)
    if match is None or match.group(1) not in VARIANTS:
        raise ConversionError(
            f"{where}: architecture is {architecture!r}, not a VOLO "
            f"({', '.join('volo_' + name for name in VARIANTS)})"
        )
    variant = match.group(1)
    num_classes = _field(document, "num_classes", int, where)
    if num_classes is None:
        num_classes = _field(pretrained, "num_classes", int, where)
    if num_classes is None:
        raise ConversionError(f"{where}: names no num_classes")
    if num_classes < 1:
        raise ConversionError(f"{where}: num_classes is {num_classes}, expected at least 1")
    model_args = _field(document, "model_args", dict, where) or {}
    image_size = _image_size(pretrained, model_args, where)
    _check_normalisation(pretrained, where)
    names = _field(document, "label_names", (list, dict), where)
    if names is None:
        names = _field(pretrained, "label_names", (list, dict), where)
    descriptions = _field(document, "label_descriptions", dict, where) or _field(
        pretrained, "label_descriptions", dict, where
    )
    labels, label_descriptions = _labels(names, descriptions, num_classes, where)
    return HubConfig(
        architecture=architecture,
        variant=variant,
        num_classes=num_classes,
        image_size=image_size,
        transform_fields=_transform_fields(pretrained, where),
        labels=labels,
        label_descriptions=label_descriptions,
    )


def check_hub_config(hub: HubConfig, config: VoloConfig, image_size: int) -> None:
    """Refuses a config.json that contradicts the tensors (`config`, `image_size` were
    detected from their shapes), naming both."""
    if hub.variant != config.name:
        raise ConversionError(
            f"{CONFIG_NAME} says {hub.architecture}, but the tensors are VOLO {config.name}"
        )
    if hub.num_classes != config.num_classes:
        raise ConversionError(
            f"{CONFIG_NAME} says num_classes {hub.num_classes}, but the head has "
            f"{config.num_classes} classes (head.weight)"
        )
    if hub.image_size is not None and hub.image_size != image_size:
        raise ConversionError(
            f"{CONFIG_NAME} says input size {hub.image_size}, but pos_embed is for {image_size}px"
        )
