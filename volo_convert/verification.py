"""Numerical parity between a Keras VOLO and the PyTorch reference on the same images."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import torch
import torch.nn.functional as F

from volo_convert.errors import ConversionError
from volo_convert.porting import IGNORED_SUFFIX
from volo_convert.torch_reference import Volo
from volo_convert.variants import DEFAULT_HEAD, VoloConfig

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_ATOL = 1e-4
DEFAULT_BATCH_SIZE = 2
DEVICES = ("auto", "cpu", "cuda")
_COARSE_GRID = 6  # the image content: a smooth bicubic field of 6x6 random colours


@dataclasses.dataclass(frozen=True)
class ParityResult:
    """How closely the Keras logits follow the PyTorch logits.

    `max_rel_diff` is the largest absolute difference relative to the largest reference
    logit; `passed` means every difference is within `atol` and all values are finite.
    `top1_agreement` is None for features, which have no classes.
    """

    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None
    atol: float
    batch_size: int
    device: str
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sample_images(batch_size: int, image_size: int, seed: int = 0) -> np.ndarray:
    """Seeded, photo-like images (smooth colour fields plus sensor noise), normalised.

    Returns:
        B, S, S, 3 float32 array, ImageNet-normalised, channels last.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, _COARSE_GRID, _COARSE_GRID, generator=generator)
    pixels = F.interpolate(
        coarse, size=(image_size, image_size), mode="bicubic", align_corners=False
    )  # B, 3, S, S
    pixels = pixels + 0.03 * torch.randn(pixels.shape, generator=generator)
    pixels = pixels.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()  # B, S, S, 3
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def resolve_device(device: str) -> torch.device:
    """Maps `auto|cpu|cuda` to a torch device, refusing CUDA where there is none."""
    if device not in DEVICES:
        raise ConversionError(f"unknown device {device!r}, expected one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    return torch.device(device)


def use_exact_float32() -> None:
    """Turns off TF32 matmuls, which would loosen GPU results to about 1e-3."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)


def build_reference(
    config: VoloConfig,
    image_size: int,
    state_dict: Mapping[str, torch.Tensor],
    device: torch.device,
    head: str = DEFAULT_HEAD,
) -> Volo:
    """The PyTorch reference in eval mode with the checkpoint's weights, on `device`.

    The weights are shared with `state_dict`, not copied; only BatchNorm's
    `num_batches_tracked` counters, unused in eval, may be absent.
    """
    with torch.device("meta"):
        reference = Volo(config, image_size, head)
    missing, unexpected = reference.load_state_dict(state_dict, strict=False, assign=True)
    missing = [key for key in missing if not key.endswith(IGNORED_SUFFIX)]
    if missing or unexpected:
        raise ConversionError(
            f"the checkpoint does not fit a VOLO {config.name} at {image_size}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return reference.to(device).eval()


def reference_logits(reference: Volo, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Runs the reference on B, S, S, 3 images; returns B, K logits."""
    with torch.inference_mode():
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)  # B, 3, S, S
        return reference(batch).float().cpu().numpy()


def keras_logits(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Runs the Keras model on B, S, S, 3 images; returns B, K logits."""
    return np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(images)))


def compare_logits(
    keras_values: np.ndarray,
    torch_values: np.ndarray,
    atol: float,
    device: str,
    are_logits: bool = True,
) -> ParityResult:
    """The parity figures for two B, K logit arrays (B, C features if not `are_logits`)."""
    diff = np.abs(keras_values.astype(np.float64) - torch_values.astype(np.float64))
    finite = bool(np.isfinite(keras_values).all() and np.isfinite(torch_values).all())
    max_abs = float(diff.max()) if finite else float("inf")
    scale = float(np.abs(torch_values).max()) if finite else 1.0
    return ParityResult(
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / scale if scale > 0 else max_abs,
        top1_agreement=(
            float((keras_values.argmax(-1) == torch_values.argmax(-1)).mean())
            if are_logits
            else None
        ),
        atol=atol,
        batch_size=int(keras_values.shape[0]),
        device=device,
        passed=finite and max_abs <= atol,
    )


def check_parity(
    model: keras.Model,
    config: VoloConfig,
    image_size: int,
    state_dict: Mapping[str, torch.Tensor],
    *,
    atol: float = DEFAULT_ATOL,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    head: str = DEFAULT_HEAD,
) -> ParityResult:
    """Compares `model` with the PyTorch reference built from `state_dict`.

    Args:
        model: the Keras VOLO, usually freshly reloaded from the saved file.
        config, image_size: the architecture both models share.
        state_dict: the checkpoint's tensors (after any pos_embed resize).
        atol: largest allowed absolute logit difference.
        device: where the reference runs (`auto`, `cpu` or `cuda`).
        batch_size, seed: the image batch.
        head: the head `model` ends in; the reference ends in the same one.
    """
    torch_device = resolve_device(device)
    use_exact_float32()
    images = sample_images(batch_size, image_size, seed)
    reference = build_reference(config, image_size, state_dict, torch_device, head)
    torch_values = reference_logits(reference, images, torch_device)
    del reference
    return compare_logits(
        keras_logits(model, images),
        torch_values,
        atol,
        torch_device.type,
        are_logits=head != "features",
    )
