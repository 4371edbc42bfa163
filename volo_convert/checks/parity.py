"""Numerical parity: how closely a converted model's outputs follow the reference's."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import numpy as np

from volo_convert.checks.images import synthetic_names
from volo_convert.checks.reference import ReferenceRun
from volo_convert.formats import Predictor, input_contract
from volo_convert.options import CLEAR_MARGIN_MULTIPLE, MIN_CLEAR_TOP1


@dataclasses.dataclass(frozen=True)
class FloorFigures:
    """A quantized file's logit error beside the weight-rounding floor's (`weight_floor.py`).

    `floor_mean_abs_diff` is the mean abs logit difference of the float model with int8
    kernels, `error_ratio` the file's over it. An image's float top-1 margin (top logit
    minus the second) is clear when it is at least CLEAR_MARGIN_MULTIPLE times the floor's
    largest abs logit difference on that image: the floor cannot flip it, nor a file whose
    noise there is within that multiple's half of the floor's. `clear_top1_agreement` is
    the file's agreement on those `clear_images` (None if there are none). `passed`: the
    ratio is at most `max_error_ratio` (unless None) and the clear-margin agreement at
    least `min_clear_top1`.
    """

    logit_std: float
    floor_mean_abs_diff: float
    floor_top1_agreement: float
    error_ratio: float
    clear_images: int
    clear_top1_agreement: float | None
    max_error_ratio: float | None
    min_clear_top1: float
    passed: bool

    @property
    def failure(self) -> str | None:
        """Which floor bar was missed, in words; None if passed."""
        if self.passed:
            return None
        if self.max_error_ratio is not None and not self.error_ratio <= self.max_error_ratio:
            return (
                f"mean abs logit diff is {self.error_ratio:.2f}x the weight-rounding floor's "
                f"{self.floor_mean_abs_diff:.3g} (at most {self.max_error_ratio:g}x)"
            )
        return (
            f"top-1 agreement {self.clear_top1_agreement:.1%} on the {self.clear_images} images "
            f"whose float margin is clear ({CLEAR_MARGIN_MULTIPLE:g}x the floor's logit error "
            f"there; at least {self.min_clear_top1:.0%})"
        )


def top1_margins(logits: np.ndarray) -> np.ndarray:
    """B, K logits -> B: each image's top logit minus its second (inf for one class)."""
    if logits.shape[-1] < 2:
        return np.full(logits.shape[0], np.inf)
    top_two = np.sort(logits.astype(np.float64), axis=-1)[:, -2:]  # B, 2
    return top_two[:, 1] - top_two[:, 0]


def clear_margins(torch_values: np.ndarray, floor_values: np.ndarray) -> np.ndarray:
    """B booleans: whose float top-1 margin is at least CLEAR_MARGIN_MULTIPLE times the
    floor's largest abs logit difference on that image."""
    floor_noise = np.abs(floor_values.astype(np.float64) - torch_values).max(-1)  # B
    return top1_margins(torch_values) >= CLEAR_MARGIN_MULTIPLE * floor_noise


def floor_figures(
    model_values: np.ndarray,
    torch_values: np.ndarray,
    floor_values: np.ndarray,
    max_error_ratio: float | None,
) -> FloorFigures:
    """The file's B, K logits and the floor's, each against the reference's, and the verdict."""
    reference = torch_values.astype(np.float64)
    model_diff = float(np.abs(model_values - reference).mean())
    floor_diff = float(np.abs(floor_values - reference).mean())
    ratio = model_diff / floor_diff if floor_diff > 0 else float("inf")
    classes = reference.argmax(-1)
    clear = clear_margins(reference, floor_values)
    model_agrees = model_values.argmax(-1) == classes
    clear_top1 = float(model_agrees[clear].mean()) if clear.any() else None
    within_ratio = max_error_ratio is None or ratio <= max_error_ratio
    return FloorFigures(
        logit_std=float(reference.std()),
        floor_mean_abs_diff=floor_diff,
        floor_top1_agreement=float((floor_values.argmax(-1) == classes).mean()),
        error_ratio=ratio,
        clear_images=int(clear.sum()),
        clear_top1_agreement=clear_top1,
        max_error_ratio=max_error_ratio,
        min_clear_top1=MIN_CLEAR_TOP1,
        passed=within_ratio and (clear_top1 is None or clear_top1 >= MIN_CLEAR_TOP1),
    )


@dataclasses.dataclass(frozen=True)
class ImageParity:
    """One verification image: each side's top class and how far the outputs differ.

    `image` is the photo's path as given (a folder's files as folder/name), or
    `synthetic[i]` for the i-th seeded image. `torch_top1_margin` is PyTorch's top logit
    minus its second, the float margin a reduced-precision file must not cross. The
    class fields are None for features, which have no classes.
    """

    image: str
    max_abs_diff: float
    torch_top1: int | None
    model_top1: int | None
    agrees: bool | None
    torch_top1_margin: float | None

    def figures(self) -> str:
        """`top-1 281 on both, max abs diff 1.2e-05`; a disagreement names both classes
        and PyTorch's margin: `top-1 3, PyTorch 7 (margin 0.412), max abs diff 0.9`."""
        if self.agrees is None:
            top1 = ""
        elif self.agrees:
            top1 = f"top-1 {self.torch_top1} on both, "
        else:
            top1 = (
                f"top-1 {self.model_top1}, PyTorch {self.torch_top1} "
                f"(margin {self.torch_top1_margin:.3g}), "
            )
        return f"{top1}max abs diff {self.max_abs_diff:.3g}"


def image_parities(
    names: Sequence[str], model_values: np.ndarray, torch_values: np.ndarray, are_logits: bool
) -> tuple[ImageParity, ...]:
    """Each image's figures, for B, K logits (B, C features if not `are_logits`).

    An image with a non-finite output on either side has max abs diff inf.
    """
    assert len(names) == len(model_values), (len(names), model_values.shape)
    model_values = model_values.astype(np.float64)
    torch_values = torch_values.astype(np.float64)
    finite = np.isfinite(model_values).all(-1) & np.isfinite(torch_values).all(-1)
    diffs = np.where(finite, np.abs(model_values - torch_values).max(-1), np.inf)
    if not are_logits:
        return tuple(
            ImageParity(name, float(diff), None, None, None, None)
            for name, diff in zip(names, diffs, strict=True)
        )
    torch_top1, model_top1 = torch_values.argmax(-1), model_values.argmax(-1)
    margins = top1_margins(torch_values)
    return tuple(
        ImageParity(
            image=name,
            max_abs_diff=float(diffs[index]),
            torch_top1=int(torch_top1[index]),
            model_top1=int(model_top1[index]),
            agrees=bool(torch_top1[index] == model_top1[index]),
            torch_top1_margin=float(margins[index]),
        )
        for index, name in enumerate(names)
    )


@dataclasses.dataclass(frozen=True)
class ParityResult:
    """How closely the converted model's logits follow the PyTorch logits.

    `max_rel_diff` is the largest absolute difference relative to the largest reference
    logit. `top1_agreement` is the fraction of images whose top class is PyTorch's; None
    for features, which have no classes. `passed` means all values are finite, every
    difference is within `atol` (unless None) and top-1 agreement is at least `min_top1`
    (unless None): float files are held to atol, bfloat16 ones to min_top1. A quantized
    file also has `floor`, its error beside the weight-rounding floor's, and must pass it.
    `per_image` holds each image's figures, in order; `photos` says whether the images
    were photos.
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
    per_image: tuple[ImageParity, ...] = ()
    photos: bool = False
    floor: FloorFigures | None = None

    @property
    def worst_image(self) -> ImageParity | None:
        """The image to look at first: of those whose top-1 differs, the one PyTorch was
        surest of (its widest top-1 margin); if none differs, the largest max abs diff."""
        disagreeing = [image for image in self.per_image if image.agrees is False]
        if disagreeing:
            return max(disagreeing, key=lambda image: image.torch_top1_margin or 0.0)
        return max(self.per_image, key=lambda image: image.max_abs_diff, default=None)

    @property
    def failure(self) -> str | None:
        """Which bar was missed, in words; None if passed."""
        if self.passed:
            return None
        if self.atol is not None and not self.max_abs_diff <= self.atol:
            return f"max abs diff {self.max_abs_diff:.3g} exceeds atol {self.atol:g}"
        if self.floor is not None and not self.floor.passed:
            return self.floor.failure
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
    names: Sequence[str] | None = None,
    photos: bool = False,
    floor_values: np.ndarray | None = None,
    max_error_ratio: float | None = None,
) -> ParityResult:
    """The parity figures for two B, K logit arrays (B, C features if not `are_logits`),
    each image's under its name in `names` (`synthetic[i]` if None) from photos or not,
    with the floor's figures when the weight-rounding floor's B, K logits are given."""
    diff = np.abs(model_values.astype(np.float64) - torch_values.astype(np.float64))
    finite = bool(np.isfinite(model_values).all() and np.isfinite(torch_values).all())
    max_abs = float(diff.max()) if finite else float("inf")
    scale = float(np.abs(torch_values).max()) if finite else 1.0
    top1 = (
        float((model_values.argmax(-1) == torch_values.argmax(-1)).mean()) if are_logits else None
    )
    if min_top1 is not None and top1 is None:  # options refuse --min-top1 for features
        raise ValueError("a top-1 bar was set for features, which have no classes")
    within_atol = atol is None or max_abs <= atol
    agrees = min_top1 is None or (top1 is not None and top1 >= min_top1)
    floor = None
    if floor_values is not None and finite:
        floor = floor_figures(model_values, torch_values, floor_values, max_error_ratio)
    return ParityResult(
        max_abs_diff=max_abs,
        mean_abs_diff=float(diff.mean()) if finite else float("inf"),
        max_rel_diff=max_abs / scale if scale > 0 else max_abs,
        top1_agreement=top1,
        atol=atol,
        min_top1=min_top1,
        batch_size=int(model_values.shape[0]),
        device=device,
        passed=finite and within_atol and agrees and (floor is None or floor.passed),
        per_image=image_parities(
            synthetic_names(len(model_values)) if names is None else names,
            model_values,
            torch_values,
            are_logits,
        ),
        photos=photos,
        floor=floor,
    )


def check_parity(
    model: Predictor,
    reference: ReferenceRun,
    atol: float | None,
    min_top1: float | None = None,
    floor_values: np.ndarray | None = None,
    max_error_ratio: float | None = None,
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
        floor_values: the weight-rounding floor's logits on the same images, for a
            quantized file; None for no floor figures.
        max_error_ratio: the largest allowed mean abs diff over the floor's, or None.
    """
    pixels = input_contract(model).kind == "pixels"
    return compare_logits(
        model_outputs(model, reference.pixels if pixels else reference.images),
        reference.outputs,
        atol,
        reference.device,
        are_logits=reference.head != "features",
        min_top1=min_top1,
        names=reference.names or None,
        photos=reference.photos,
        floor_values=floor_values,
        max_error_ratio=max_error_ratio,
    )


def worst_parity(results: list[ParityResult]) -> ParityResult:
    """Of several runs' parity on the same images, the first that failed, else the furthest."""
    failed = [result for result in results if not result.passed]
    return failed[0] if failed else max(results, key=lambda result: result.max_abs_diff)
