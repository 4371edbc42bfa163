"""Training-mode parity: the converted model learns like the original.

Both models run in training mode on the same seeded batch, with drop path and dropout at
rate 0 and BatchNorm on batch statistics. A cross-entropy loss against fixed labels is
back-propagated in each framework, and each weight's gradient is compared with the torch
gradient moved through the same mapping row and transform that ported the weight. Then one
SGD step is taken in each framework and the weights after it are compared, the BatchNorm
moving statistics included. Each tensor is judged by its relative L2 error, against the
norm of the quantity compared, so a wrong transpose shows even where the shapes agree.
The steps themselves are taken in `training_steps.py`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import keras
import numpy as np
import torch

from volo_convert.architecture.keras_model import model_head, model_input
from volo_convert.architecture.variants import STAGES as NETWORK_STAGES
from volo_convert.architecture.variants import STEM_STRIDE, VoloConfig
from volo_convert.checks.images import normalize, sample_pixels
from volo_convert.checks.reference import resolve_device, use_exact_float32
from volo_convert.checks.training_steps import (
    TrainingStep,
    fixed_labels,
    keras_training_step,
    to_numpy,
    torch_training_step,
)
from volo_convert.options import (
    DEFAULT_ATOL,
    DEFAULT_SEED,
    DEFAULT_VERIFY_IMAGES,
    TRAINING_GRADIENT_RTOL,
    TRAINING_LEARNING_RATE,
    TRAINING_STATISTICS_RTOL,
    TRAINING_STEP_RTOL,
)
from volo_convert.text_table import render_table
from volo_convert.weights.mapping import WeightMapping, weight_mappings
from volo_convert.weights.transforms import TRANSFORMS

VARIANCE_SUFFIX = "/moving_variance"  # Keras BatchNormalization's running variance
WORST_LISTED = 5
# The network's stages, then `head` for the head layers' weights (head and aux_head).
STAGES = (*NETWORK_STAGES, "head")
# The stage a weight belongs to, from its Keras layer name; checked in this order.
_STAGE_PATTERNS = (
    (re.compile(r"^(stem|stack\d+|classifier\d+)_"), None),
    (re.compile(r"^(downsample|pos_embed)/"), "downsample"),
    (re.compile(r"^cls_token/"), "classifier0"),  # it enters at the first class block
    (re.compile(r"^norm/"), "norm"),
    (re.compile(r"^(head|aux_head)/"), "head"),
)


@dataclasses.dataclass(frozen=True)
class TensorDifference:
    """One weight's Keras quantity against the torch one moved through its mapping row.

    `relative_error` is ||keras - torch|| / ||torch|| (L2 over the whole tensor), where the
    norm is that of the quantity named by the list holding it.
    """

    torch_key: str
    keras_path: str
    stage: str
    relative_error: float
    tolerance: float
    within_tolerance: bool


@dataclasses.dataclass(frozen=True)
class TrainingParity:
    """How the converted model trains against the reference, on one batch.

    `gradients`: each trainable weight's gradient, relative to the torch gradient's norm.
    `steps`: each trainable weight after one SGD step, relative to the norm of the torch
    step. `statistics`: the BatchNorm moving statistics after that step, relative to their
    own norm. All three in network order (STAGES).
    """

    logits_max_abs_diff: float
    loss_abs_diff: float
    atol: float
    gradients: tuple[TensorDifference, ...]
    steps: tuple[TensorDifference, ...]
    statistics: tuple[TensorDifference, ...]
    learning_rate: float
    batch_size: int
    backend: str
    device: str
    passed: bool

    @property
    def failure_reason(self) -> str | None:
        """One line naming what is out of tolerance first; None if nothing is."""
        if not self.logits_max_abs_diff <= self.atol:
            return (
                f"training-mode logits differ by {self.logits_max_abs_diff:.3g}, "
                f"above atol {self.atol:g}"
            )
        for what, items in (
            ("gradient", self.gradients),
            ("weight after one SGD step", self.steps),
            ("BatchNorm statistic after one step", self.statistics),
        ):
            failed = [item for item in items if not item.within_tolerance]
            if failed:
                worst = max(failed, key=lambda item: item.relative_error)
                return (
                    f"{len(failed)} of {len(items)} {what}s out of tolerance, worst "
                    f"{worst.torch_key} ({worst.keras_path}) off by "
                    f"{worst.relative_error:.3g} relative L2, tolerance {worst.tolerance:g}"
                )
        return None

    def worst_per_stage(self) -> dict[str, TensorDifference]:
        """Stage -> its weight with the largest relative gradient error, in network order."""
        return {
            stage: max(items, key=lambda item: item.relative_error)
            for stage in STAGES
            if (items := [item for item in self.gradients if item.stage == stage])
        }


def weight_stage(keras_path: str) -> str:
    """The stage a Keras weight (`layer/weight`) belongs to, as the diagnosis names stages."""
    for pattern, stage in _STAGE_PATTERNS:
        if match := pattern.match(keras_path):
            return stage or match.group(1)
    raise ValueError(f"no stage for Keras weight {keras_path!r}")


def _difference(
    mapping: WeightMapping,
    actual: np.ndarray,
    expected: np.ndarray,
    scale: np.ndarray,
    tolerance: float,
) -> TensorDifference:
    """One weight's figures: ||actual - expected|| / ||scale|| against `tolerance`."""
    error = relative_l2(actual, expected, scale)
    return TensorDifference(
        mapping.torch_key,
        mapping.keras_path or "",
        weight_stage(mapping.keras_path or ""),
        error,
        tolerance,
        error <= tolerance,
    )


def relative_l2(actual: np.ndarray, expected: np.ndarray, scale: np.ndarray) -> float:
    """||actual - expected|| / ||scale||; 0 when both are zero."""
    error = float(np.linalg.norm(actual - expected))
    norm = float(np.linalg.norm(scale))
    if norm == 0:
        return 0.0 if error == 0 else math.inf
    return error / norm


def compare_training_steps(
    keras_step: TrainingStep,
    torch_step: TrainingStep,
    state_dict: Mapping[str, torch.Tensor],
    mappings: list[WeightMapping],
    samples_per_channel: int,
) -> tuple[tuple[TensorDifference, ...], ...]:
    """Every mapped weight's gradient, weight after the step and statistic, in that order.

    The torch side is moved into Keras layout by the same row and transform that ported
    the weight. `state_dict` holds the weights before the step; `samples_per_channel` is
    what each stem BatchNorm normalises over (batch x height x width).
    """
    gradients, steps, statistics = [], [], []
    for mapping in sorted(
        (mapping for mapping in mappings if mapping.keras_path),
        key=lambda mapping: STAGES.index(weight_stage(mapping.keras_path or "")),
    ):
        transform = TRANSFORMS[mapping.transform]
        keras_path = mapping.keras_path or ""
        after = transform(torch_step.weights_after[mapping.torch_key])
        keras_after = to_numpy(keras_step.weights_after[keras_path])
        if keras_path in keras_step.gradients:
            gradient = transform(torch_step.gradients[mapping.torch_key])
            keras_gradient = to_numpy(keras_step.gradients[keras_path])
            gradients.append(
                _difference(mapping, keras_gradient, gradient, gradient, TRAINING_GRADIENT_RTOL)
            )
            step = after - transform(state_dict[mapping.torch_key].cpu().numpy())
            steps.append(_difference(mapping, keras_after, after, step, TRAINING_STEP_RTOL))
        else:
            # torch updates running_var with the unbiased batch variance, Keras with the
            # biased one: n / (n - 1) apart. That moves the statistic by at most 1/n of
            # itself, so running variances are allowed 1/n more.
            tolerance = TRAINING_STATISTICS_RTOL
            if keras_path.endswith(VARIANCE_SUFFIX):
                tolerance += 1 / samples_per_channel
            statistics.append(_difference(mapping, keras_after, after, after, tolerance))
    return tuple(gradients), tuple(steps), tuple(statistics)


def check_training_parity(
    model: keras.Model,
    config: VoloConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    mappings: list[WeightMapping] | None = None,
    atol: float = DEFAULT_ATOL,
    batch_size: int = DEFAULT_VERIFY_IMAGES,
    seed: int = DEFAULT_SEED,
    learning_rate: float = TRAINING_LEARNING_RATE,
    device: torch.device | str = "cpu",
) -> TrainingParity:
    """Trains `model` and the PyTorch reference one step on the same batch and compares.

    `model` keeps its weights: its step is taken statelessly, with drop rates held at 0.

    Args:
        model: the converted Keras VOLO (any head; features are taken as the logits).
        config: its architecture.
        state_dict: the checkpoint's tensors at the model's image size.
        mappings: the rows that ported the weights, used again to move the torch gradients
            and weights into Keras layout; the shipped tables by default.
        atol: largest allowed absolute difference of the training-mode logits.
        batch_size, seed: the images and labels.
        learning_rate: of the SGD step.
        device: where the reference trains.
    """
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    use_exact_float32()
    head = model_head(model)
    mappings = mappings if mappings is not None else weight_mappings(config, head)
    image_size = model.input_shape[1]
    pixels = sample_pixels(batch_size, image_size, seed)
    images = normalize(pixels)
    labels = fixed_labels(batch_size, model.output_shape[-1], seed)

    keras_inputs = pixels.astype(np.float32) if model_input(model) == "pixels" else images
    keras_step = keras_training_step(model, keras_inputs, labels, learning_rate)
    torch_step = torch_training_step(
        config, state_dict, head, images, labels, learning_rate, torch_device
    )
    samples_per_channel = batch_size * (image_size // STEM_STRIDE) ** 2
    gradients, steps, statistics = compare_training_steps(
        keras_step, torch_step, state_dict, mappings, samples_per_channel
    )
    logits_diff = keras_step.logits.astype(np.float64) - torch_step.logits.astype(np.float64)
    logits_max_abs_diff = float(np.abs(logits_diff).max())
    every_tensor = (*gradients, *steps, *statistics)
    return TrainingParity(
        logits_max_abs_diff=logits_max_abs_diff,
        loss_abs_diff=abs(keras_step.loss - torch_step.loss),
        atol=atol,
        gradients=gradients,
        steps=steps,
        statistics=statistics,
        learning_rate=learning_rate,
        batch_size=batch_size,
        backend=keras.backend.backend(),
        device=torch_device.type,
        passed=logits_max_abs_diff <= atol and all(item.within_tolerance for item in every_tensor),
    )


def format_training(parity: TrainingParity) -> str:
    """The training check as the CLI prints it: logits and loss, then the worst tensors."""
    lines = [
        f"training mode: {parity.backend} gradients, {parity.batch_size} images, BatchNorm on "
        "batch statistics, drop rates 0",
        f"training logits max abs diff {parity.logits_max_abs_diff:.3g}  (atol {parity.atol:g}), "
        f"loss diff {parity.loss_abs_diff:.3g}",
    ]
    groups = {
        "gradient": parity.gradients,
        f"after SGD step (lr {parity.learning_rate:g})": parity.steps,
        "BatchNorm statistic": parity.statistics,
    }
    rows: list[tuple[str, ...] | str] = [
        ("worst relative L2", "Keras weight", "error", "tolerance", "")
    ]
    for title, items in groups.items():
        rows.append(f"{title}: {len(items)} tensors")
        worst = sorted(items, key=lambda item: item.relative_error, reverse=True)[:WORST_LISTED]
        rows += [
            (
                f"  {item.torch_key}",
                item.keras_path,
                f"{item.relative_error:.3g}",
                f"{item.tolerance:.3g}",
                "ok" if item.within_tolerance else "OUT",
            )
            for item in worst
        ]
    lines += render_table(rows, right_aligned=(2, 3))
    lines.append("training parity " + ("passed" if parity.passed else "FAILED"))
    return "\n".join(lines)
