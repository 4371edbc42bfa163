"""Parity per variant: convert a synthetic checkpoint of each variant and verify it.

Prints a Markdown table for docs/BENCHMARKS.md. Besides the Keras-vs-PyTorch figures it
shows how far each float32 model is from a float64 run of the reference, which tells
float32 noise apart from a conversion error.

    python scripts/bench_parity.py --variants d1 d2 d3 d4 d5 --image-size 224
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import torch

from volo_convert.architecture.variants import VARIANTS
from volo_convert.checks.images import sample_images
from volo_convert.checks.parity import model_outputs
from volo_convert.checks.reference import build_reference
from volo_convert.environment import environment_line
from volo_convert.options import ConvertOptions
from volo_convert.pipeline import convert
from volo_convert.synthetic import write_checkpoint
from volo_convert.weights.loading import load_checkpoint


def float64_distances(
    checkpoint: Path, keras_file: Path, image_size: int, batch_size: int, seed: int
) -> tuple[float, float]:
    """Max |logit - float64 logit| for the Keras model and for the float32 reference."""
    loaded = load_checkpoint(checkpoint, ConvertOptions())
    images = sample_images(batch_size, image_size, seed)
    reference = build_reference(loaded.config, image_size, loaded.state_dict, torch.device("cpu"))
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)  # B, 3, S, S
    with torch.inference_mode():
        torch32 = reference(batch).numpy()
        truth = reference.double()(batch.double()).numpy()
    keras32 = model_outputs(keras.models.load_model(keras_file), images)
    keras.backend.clear_session()
    return float(np.abs(keras32 - truth).max()), float(np.abs(torch32 - truth).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=sorted(VARIANTS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(
        f"Environment: {environment_line()}; "
        f"{args.batch_size} seeded images at {args.image_size}px, reference on CPU.\n"
    )
    print(
        "| variant | parameters | max abs diff | max rel diff | top-1 agreement "
        "| Keras vs float64 | PyTorch fp32 vs float64 | convert s | verify s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.variants:
            checkpoint = write_checkpoint(
                Path(folder) / f"{variant}.pth.tar", VARIANTS[variant], args.image_size
            )
            keras_file = Path(folder) / f"{variant}.keras"
            result = convert(
                checkpoint,
                keras_file,
                ConvertOptions(device="cpu", verify_images=args.batch_size, seed=args.seed),
            )
            assert result.parity is not None, "verification was skipped"
            keras_to_truth, torch_to_truth = float64_distances(
                checkpoint, keras_file, args.image_size, args.batch_size, args.seed
            )
            parity = result.parity
            print(
                f"| {variant} | {result.parameters:,} | {parity.max_abs_diff:.2e} "
                f"| {parity.max_rel_diff:.2e} | {parity.top1_agreement:.0%} "
                f"| {keras_to_truth:.2e} | {torch_to_truth:.2e} "
                f"| {result.convert_seconds:.1f} | {result.verify_seconds:.1f} |",
                flush=True,
            )
            checkpoint.unlink()
            keras_file.unlink()


if __name__ == "__main__":
    main()
