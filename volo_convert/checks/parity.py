"""Numerical parity: how closely a converted model's outputs follow the reference's."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from volo_convert.checks.reference import ReferenceRun
from volo_convert.formats import Predictor


@dataclasses.dataclass(frozen=True)
class ParityResult:
    """How closely the converted model's logits follow the PyTorch logits.

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


def model_outputs(model: Predictor, images: np.ndarray) -> np.ndarray:
    """Runs a Keras model or a format runner on B, S, S, 3 images; returns B, K outputs."""
    return np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(images)))


def compare_logits(
    model_values: np.ndarray,
    torch_values: np.ndarray,
    atol: float,
    device: str,
    are_logits: bool = True,
) -> ParityResult:
    """The parity figures for two B, K logit arrays (B, C features if not `are_logits`)."""
    diff = np.abs(model_values.astype(np.float64) - torch_values.astype(np.float64))
    finite = bool(np.isfinite(model_values).all() and np.isfinite(torch_values).all())
    max_abs = float(diff.max()) if finite else float("inf")
    scale = float(np.abs(torch_values).max()) if finite else 1.0
    return ParityResult(
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / scale if scale > 0 else max_abs,
        top1_agreement=(
            float((model_values.argmax(-1) == torch_values.argmax(-1)).mean())
            if are_logits
            else None
        ),
        atol=atol,
        batch_size=int(model_values.shape[0]),
        device=device,
        passed=finite and max_abs <= atol,
    )


def check_parity(model: Predictor, reference: ReferenceRun, atol: float) -> ParityResult:
    """Runs `model` on the reference run's images and compares the final outputs.

    Args:
        model: the converted model (usually reloaded from its file), ending in the
            same head as the reference.
        reference: the reference's run on the verification images.
        atol: largest allowed absolute difference.
    """
    return compare_logits(
        model_outputs(model, reference.images),
        reference.outputs,
        atol,
        reference.device,
        are_logits=reference.head != "features",
    )
