"""Numerical parity: how closely a converted model's outputs follow the reference's."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from volo_convert.checks.reference import ReferenceRun
from volo_convert.formats import Predictor, input_contract


@dataclasses.dataclass(frozen=True)
class ParityResult:
    """How closely the converted model's logits follow the PyTorch logits.

    `max_rel_diff` is the largest absolute difference relative to the largest reference
    logit. `top1_agreement` is the fraction of images whose top class is PyTorch's; None
    for features, which have no classes. `passed` means all values are finite, every
    difference is within `atol` (unless None) and top-1 agreement is at least `min_top1`
    (unless None): float files are held to atol, quantized ones to min_top1.
    """

    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None
    atol: float | None
    min_top1: float | None
    batch_size: int
    device: str
    passed: bool

    @property
    def failure(self) -> str | None:
        """Which bar was missed, in words; None if passed."""
        if self.passed:
            return None
        if self.atol is not None and not self.max_abs_diff <= self.atol:
            return f"max abs diff {self.max_abs_diff:.3g} exceeds atol {self.atol:g}"
        if self.min_top1 is not None and self.top1_agreement is not None:
            return (
                f"top-1 agreement {self.top1_agreement:.1%} is below --min-top1 "
                f"{self.min_top1:.0%} ({self.batch_size} images)"
            )
        return "the outputs are not finite"


def model_outputs(model: Predictor, images: np.ndarray) -> np.ndarray:
    """Runs a Keras model or a format runner on B, S, S, 3 images; returns B, K outputs."""
    return np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(images)))


def compare_logits(
    model_values: np.ndarray,
    torch_values: np.ndarray,
    atol: float | None,
    device: str,
    are_logits: bool = True,
    min_top1: float | None = None,
) -> ParityResult:
    """The parity figures for two B, K logit arrays (B, C features if not `are_logits`)."""
    diff = np.abs(model_values.astype(np.float64) - torch_values.astype(np.float64))
    finite = bool(np.isfinite(model_values).all() and np.isfinite(torch_values).all())
    max_abs = float(diff.max()) if finite else float("inf")
    scale = float(np.abs(torch_values).max()) if finite else 1.0
    top1 = (
        float((model_values.argmax(-1) == torch_values.argmax(-1)).mean()) if are_logits else None
    )
    within_atol = atol is None or max_abs <= atol
    agrees = min_top1 is None or (top1 is not None and top1 >= min_top1)
    return ParityResult(
        max_abs_diff=max_abs,
        mean_abs_diff=float(diff.mean()) if finite else float("inf"),
        max_rel_diff=max_abs / scale if scale > 0 else max_abs,
        top1_agreement=top1,
        atol=atol,
        min_top1=min_top1,
        batch_size=int(model_values.shape[0]),
        device=device,
        passed=finite and within_atol and agrees,
    )


def check_parity(
    model: Predictor, reference: ReferenceRun, atol: float | None, min_top1: float | None = None
) -> ParityResult:
    """Runs `model` on the reference run's images and compares the final outputs.

    A model that takes pixels is fed the reference's pixels, the reference their
    normalised form, so both see the same photographs.

    Args:
        model: the converted model (usually reloaded from its file), ending in the
            same head as the reference.
        reference: the reference's run on the verification images.
        atol: largest allowed absolute difference, or None for no such bar.
        min_top1: smallest allowed top-1 agreement, or None for no such bar.
    """
    pixels = input_contract(model).kind == "pixels"
    return compare_logits(
        model_outputs(model, reference.pixels if pixels else reference.images),
        reference.outputs,
        atol,
        reference.device,
        are_logits=reference.head != "features",
        min_top1=min_top1,
    )


def worst_parity(results: list[ParityResult]) -> ParityResult:
    """Of several runs' parity on the same images, the first that failed, else the furthest."""
    failed = [result for result in results if not result.passed]
    return failed[0] if failed else max(results, key=lambda result: result.max_abs_diff)
