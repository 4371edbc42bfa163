"""A model file's input contract: what it takes, in which type, and how to feed it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volo_convert.architecture.variants import IMAGENET_MEAN, IMAGENET_STD, PIXEL_MAX
from volo_convert.errors import ConversionError
from volo_convert.options import DEFAULT_INPUT, INPUTS

if TYPE_CHECKING:
    import numpy as np

# What each input kind holds, as the report spells it.
INPUT_VALUES = {
    "images": "RGB scaled to [0, 1], then normalised with ImageNet mean and std",
    "pixels": f"RGB values in 0..{PIXEL_MAX:g}; the model scales and normalises them",
}


@dataclasses.dataclass(frozen=True)
class InputContract:
    """What a model takes: B, S, S, 3 `images` or `pixels`, as `dtype`.

    A quantized input (int8, uint8) holds `round(value / scale) + zero_point`, where
    value is what a float input of the same kind would hold.
    """

    kind: str = DEFAULT_INPUT
    dtype: str = "float32"
    scale: float | None = None
    zero_point: int | None = None

    def encode(self, values: np.ndarray) -> np.ndarray:
        """B, S, S, 3 float images or pixels (or uint8 pixels) -> what the model is fed."""
        import numpy as np

        if self.scale is None or self.zero_point is None:
            return values.astype(self.dtype)
        limits = np.iinfo(self.dtype)
        quantized = np.round(values.astype(np.float64) / self.scale) + self.zero_point
        return np.clip(quantized, limits.min, limits.max).astype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """The contract as the report writes it, with the preprocessing spelled out."""
        contract: dict[str, Any] = {
            "kind": self.kind,
            "dtype": self.dtype,
            "layout": "B, S, S, 3 (RGB, channels last)",
            "values": INPUT_VALUES[self.kind],
        }
        if self.kind == "images":
            contract["mean"], contract["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
        if self.scale is not None:
            contract["scale"], contract["zero_point"] = self.scale, self.zero_point
        return contract


def check_input_kind(kind: object, where: str | Path) -> str:
    """`kind` as a file recorded it, refused unless it is one of INPUTS."""
    if kind not in INPUTS:
        raise ConversionError(f"{where}: records an unknown input kind {kind!r}")
    return str(kind)


def check_classifier_shapes(
    input_shape: tuple[Any, ...], output_shape: tuple[Any, ...], where: str | Path
) -> None:
    """Refuses a file that is no image classifier: VOLO takes B, S, S, 3 and returns B, K.

    A SavedModel or TFLite file from elsewhere would otherwise fail deep inside a run.
    """
    if len(input_shape) != 4 or input_shape[1] != input_shape[2] or input_shape[3] != 3:
        raise ConversionError(
            f"{where}: takes inputs of shape {_shape_text(input_shape)}, not B, S, S, 3 images"
        )
    if len(output_shape) != 2:
        raise ConversionError(
            f"{where}: returns outputs of shape {_shape_text(output_shape)}, not B, K"
        )


def _shape_text(shape: tuple[Any, ...]) -> str:
    """(None, 224, 200, 3) as `(B, 224, 200, 3)`."""
    return "(" + ", ".join("B" if size is None else str(size) for size in shape) + ")"
