"""Inference speed of the converted Keras VOLO against the PyTorch reference.

Every call path is timed in turn inside each round (alternating), and the medians over
the rounds are compared, so a neighbour's load on a shared machine hits all paths alike.

    python scripts/bench_inference.py --variant d1 --image-size 224 --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf
import torch

from volo_convert.architecture.keras_model import build_volo
from volo_convert.architecture.variants import VARIANTS
from volo_convert.checks.images import sample_images
from volo_convert.checks.reference import build_reference
from volo_convert.environment import environment_line
from volo_convert.synthetic import make_state_dict
from volo_convert.weights.mapping import weight_mappings
from volo_convert.weights.porting import port_weights


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else the platform's word for it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def call_paths(model: keras.Model, reference: torch.nn.Module) -> dict[str, Callable[[Any], Any]]:
    """Name -> function running one batch (NHWC numpy in, logits out)."""
    graph = tf.function(model, reduce_retracing=True)
    xla = tf.function(model, jit_compile=True, reduce_retracing=True)

    def torch_call(images: np.ndarray) -> Any:
        with torch.inference_mode():
            return reference(torch.from_numpy(images).permute(0, 3, 1, 2))  # B, 3, S, S

    return {
        "torch inference_mode": torch_call,
        "keras predict_on_batch": model.predict_on_batch,
        "keras tf.function": lambda images: graph(tf.constant(images)).numpy(),
        "keras tf.function jit_compile": lambda images: xla(tf.constant(images)).numpy(),
    }


def time_paths(
    paths: dict[str, Callable[[Any], Any]], images: np.ndarray, rounds: int, warmup: int
) -> dict[str, float]:
    """Median seconds per batch of each path, timed alternately round by round."""
    for call in paths.values():
        for _ in range(warmup):
            call(images)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, call in paths.items():
            started = time.perf_counter()
            call(images)
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="d1", choices=sorted(VARIANTS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    torch.set_num_threads(args.threads)

    config = VARIANTS[args.variant]
    state_dict = make_state_dict(config, args.image_size)
    model = build_volo(config, args.image_size)
    port_weights(model, state_dict, weight_mappings(config))
    reference = build_reference(config, args.image_size, state_dict, torch.device("cpu"))
    paths = call_paths(model, reference)

    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}; threads {args.threads} (TF intra-op, torch)"
    )
    print(f"environment: {environment_line()}")
    print(f"VOLO {args.variant} at {args.image_size}px, median of {args.rounds} alternating rounds")
    print()
    print("| batch | path | median s/batch | images/s | time vs PyTorch |")
    print("|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        images = sample_images(batch_size, args.image_size, seed=1)
        medians = time_paths(paths, images, args.rounds, args.warmup)
        torch_seconds = medians["torch inference_mode"]
        for name, seconds in medians.items():
            print(
                f"| {batch_size} | {name} | {seconds:.4f} | {batch_size / seconds:.1f} | "
                f"{seconds / torch_seconds:.2f}x |"
            )


if __name__ == "__main__":
    main()
