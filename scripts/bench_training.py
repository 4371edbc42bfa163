"""Training-mode parity of one converted variant: the worst relative gradient error per stage.

Measures accuracy, not speed, so machine load does not matter. One batch in training mode
(BatchNorm on batch statistics, drop rates 0), cross-entropy against fixed labels:

- Keras (float32) against PyTorch float32, each torch gradient moved into Keras layout by
  the mapping tables: what `volo-convert verify --training` checks;
- both against PyTorch float64, the exact gradient up to float64 rounding, which tells
  float32 noise apart from a conversion error;
- the model under `mixed_bfloat16` against float32, in inference.

Prints Markdown for docs/BENCHMARKS.md.

    python scripts/bench_training.py --variant d1 --image-size 224
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import torch

from volo_convert.architecture.keras_model import build_volo, with_dtype_policy
from volo_convert.architecture.variants import STEM_STRIDE, VARIANTS
from volo_convert.checks.images import sample_images
from volo_convert.checks.parity import model_outputs
from volo_convert.checks.training import STAGES, check_training_parity, compare_training_steps
from volo_convert.checks.training_steps import (
    TrainingStep,
    fixed_labels,
    keras_training_step,
    torch_training_step,
)
from volo_convert.environment import environment_line
from volo_convert.options import TRAINING_LEARNING_RATE
from volo_convert.synthetic import make_state_dict
from volo_convert.weights.mapping import WeightMapping, weight_mappings
from volo_convert.weights.porting import port_weights
from volo_convert.weights.transforms import TRANSFORMS

MIXED_PRECISION_IMAGES = 8


def in_keras_layout(step: TrainingStep, mappings: list[WeightMapping]) -> TrainingStep:
    """A torch step renamed and laid out as Keras's, through the mapping tables."""
    rows = [mapping for mapping in mappings if mapping.keras_path]
    return TrainingStep(
        step.logits,
        step.loss,
        {
            row.keras_path: TRANSFORMS[row.transform](step.gradients[row.torch_key])
            for row in rows
            if row.torch_key in step.gradients
        },
        {
            row.keras_path: TRANSFORMS[row.transform](step.weights_after[row.torch_key])
            for row in rows
        },
    )


def worst_per_stage(differences: tuple) -> dict[str, tuple[float, str]]:
    """Stage -> (largest relative error, its torch tensor)."""
    return {
        stage: max((item.relative_error, item.torch_key) for item in items)
        for stage in STAGES
        if (items := [item for item in differences if item.stage == stage])
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="d1", choices=sorted(VARIANTS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config, size, batch_size = VARIANTS[args.variant], args.image_size, args.batch_size

    state_dict = make_state_dict(config, size, seed=args.seed)
    mappings = weight_mappings(config)
    model = build_volo(config, size)
    port_weights(model, state_dict, mappings)
    parity = check_training_parity(
        model, config, state_dict, batch_size=batch_size, seed=args.seed, device="cpu"
    )

    images = sample_images(batch_size, size, args.seed)
    labels = fixed_labels(batch_size, config.num_classes, args.seed)
    lr = TRAINING_LEARNING_RATE
    cpu = torch.device("cpu")
    keras_step = keras_training_step(model, images, labels, lr)
    torch32 = torch_training_step(config, state_dict, "full", images, labels, lr, cpu)
    state_dict64 = {key: tensor.double() for key, tensor in state_dict.items()}
    exact = torch_training_step(config, state_dict64, "full", images, labels, lr, cpu)
    samples = batch_size * (size // STEM_STRIDE) ** 2
    keras_to_exact = compare_training_steps(keras_step, exact, state_dict, mappings, samples)[0]
    torch_to_exact = compare_training_steps(
        in_keras_layout(torch32, mappings), exact, state_dict, mappings, samples
    )[0]

    print(f"Environment: {environment_line()}\n")
    print(
        f"VOLO {args.variant} at {size}px (synthetic weights, seed {args.seed}), "
        f"{batch_size} seeded images, {len(parity.gradients)} trainable tensors; training-mode "
        f"logits max abs diff {parity.logits_max_abs_diff:.2e}, loss diff "
        f"{parity.loss_abs_diff:.2e}; training check "
        f"{'passed' if parity.passed else 'FAILED'}.\n"
    )
    print(
        "| stage | worst Keras vs PyTorch fp32 | tensor | Keras vs float64 "
        "| PyTorch fp32 vs float64 |"
    )
    print("|---|---|---|---|---|")
    keras_worst, torch_worst = worst_per_stage(keras_to_exact), worst_per_stage(torch_to_exact)
    for stage, (error, torch_key) in worst_per_stage(parity.gradients).items():
        print(
            f"| {stage} | {error:.2e} | `{torch_key}` | {keras_worst[stage][0]:.2e} "
            f"| {torch_worst[stage][0]:.2e} |"
        )
    for title, items in (("after one SGD step", parity.steps), ("BatchNorm", parity.statistics)):
        worst = max(items, key=lambda item: item.relative_error)
        print(
            f"\nWorst {title}: {worst.relative_error:.2e} (`{worst.torch_key}`, tolerance "
            f"{worst.tolerance:.3g})."
        )

    mixed_images = sample_images(MIXED_PRECISION_IMAGES, size, args.seed + 1)
    float32_logits = model_outputs(model, mixed_images)
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    mixed = with_dtype_policy(model, "mixed_bfloat16")
    mixed_logits = model_outputs(mixed, mixed_images).astype(np.float32)
    keras.mixed_precision.set_dtype_policy("float32")
    diff = float(np.abs(mixed_logits - float32_logits).max())
    scale = float(np.abs(float32_logits).max())
    agreement = float((mixed_logits.argmax(-1) == float32_logits.argmax(-1)).mean())
    print(
        f"\nmixed_bfloat16 against float32, {MIXED_PRECISION_IMAGES} images: logits max abs "
        f"diff {diff:.3g} ({diff / scale:.2%} of the largest logit, {scale:.3g}), top-1 "
        f"agreement {agreement:.0%}."
    )


if __name__ == "__main__":
    main()
