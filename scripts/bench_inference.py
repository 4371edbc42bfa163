"""Inference speed of the converted Keras VOLO against PyTorch, beside the machine's matmul rate.

Each contender (PyTorch and Keras in float32; with --bfloat16 also PyTorch under bfloat16
autocast and Keras built with `compute_dtype="bfloat16"`) lives in its own process and builds
its model once. The driver then asks them in turn, round after round, to time one batch, so a
neighbour's load hits every contender alike, and reports the median over the rounds. Beside
each time: the GFLOP/s it achieves (matmul and convolution FLOPs counted from the model by
torch's FlopCounterMode, per image, at this resolution) and that rate as a share of its own
framework's large-matmul rate, measured in the same run (scripts/quiet_machine.py), so every
ratio has the machine's limit next to it.

    python scripts/bench_inference.py --variant d1 --image-size 224 --batch-sizes 1 8 --threads 2
    python scripts/bench_inference.py --variant d1 --image-size 224 --batch-sizes 8 --bfloat16
    python scripts/bench_inference.py --variant d3 --image-size 448 --batch-sizes 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quiet_machine import add_load_arguments, limit_line, matmul_rates, require_quiet

MIN_ROUNDS = 5
WARMUP_CALLS = 2
SETTLE_SECONDS = 0.2  # pause between contenders, so one's spinning threads do not slow the next


@dataclass(frozen=True)
class Contender:
    """One way of running the model: its framework, and its compute dtype."""

    framework: str  # "torch" or "keras"
    dtype: str  # "float32" or "bfloat16"

    @property
    def name(self) -> str:
        return {
            ("torch", "float32"): "PyTorch inference_mode",
            ("torch", "bfloat16"): "PyTorch bfloat16 autocast",
            ("keras", "float32"): "Keras predict_on_batch",
            ("keras", "bfloat16"): "Keras compute_dtype=bfloat16",
        }[self.framework, self.dtype]

    @property
    def rate_key(self) -> str:
        """The quiet_machine.matmul_rates entry that bounds this contender."""
        return f"{'torch' if self.framework == 'torch' else 'tensorflow'} {self.dtype}"


FRAMEWORKS = ("torch", "keras")
BASELINE = Contender("torch", "float32")


def _batch_runner(contender: Contender, variant: str, image_size: int) -> Callable[[Any], Any]:
    """Builds the contender's model (synthetic weights); returns a function of NHWC images."""
    import torch

    from volo_convert.architecture.variants import VARIANTS
    from volo_convert.synthetic import make_state_dict

    config = VARIANTS[variant]
    state_dict = make_state_dict(config, image_size)
    if contender.framework == "torch":
        from volo_convert.checks.reference import build_reference

        reference = build_reference(config, image_size, state_dict, torch.device("cpu"))

        def torch_call(images: Any) -> Any:
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=contender.dtype == "bfloat16"),
            ):
                return reference(torch.from_numpy(images).permute(0, 3, 1, 2))  # B, 3, S, S

        return torch_call
    from volo_convert.architecture.keras_model import build_volo
    from volo_convert.weights.mapping import weight_mappings
    from volo_convert.weights.porting import port_weights

    dtype_option = {"compute_dtype": contender.dtype} if contender.dtype != "float32" else {}
    model = build_volo(config, image_size, **dtype_option)
    port_weights(model, state_dict, weight_mappings(config))
    return model.predict_on_batch


def _flops_per_image(variant: str, image_size: int) -> float:
    """Matmul and convolution FLOPs of one image through the PyTorch reference."""
    from torch.utils.flop_counter import FlopCounterMode

    from volo_convert.checks.images import sample_images

    call = _batch_runner(BASELINE, variant, image_size)
    with FlopCounterMode(display=False) as counter:
        call(sample_images(1, image_size, seed=1))
    return float(counter.get_total_flops())


def serve(contender: Contender, variant: str, image_size: int, threads: int) -> None:
    """Child process: builds the model, then times one batch per request read from stdin."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    # TensorFlow's threads are set first, before torch is imported, as in a Keras server.
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import torch

    from volo_convert.checks.images import sample_images

    torch.set_num_threads(threads)
    call = _batch_runner(contender, variant, image_size)
    print("ready", flush=True)
    batches: dict[int, Any] = {}
    for request in sys.stdin:
        if request.strip() == "flops":
            print(_flops_per_image(variant, image_size), flush=True)
            continue
        batch_size = int(request)
        if batch_size not in batches:
            batches[batch_size] = sample_images(batch_size, image_size, seed=1)
            for _ in range(WARMUP_CALLS):
                call(batches[batch_size])
        started = time.perf_counter()
        call(batches[batch_size])
        print(time.perf_counter() - started, flush=True)


class Child:
    """A contender's serving process, asked over a pipe."""

    def __init__(self, contender: Contender, args: argparse.Namespace) -> None:
        command = [
            sys.executable,
            __file__,
            "--serve",
            f"{contender.framework}:{contender.dtype}",
            "--variant",
            args.variant,
            "--image-size",
            str(args.image_size),
            "--threads",
            str(args.threads),
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        if self._read() != "ready":
            raise SystemExit(f"{contender.name}: its process failed to start")

    def _read(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def ask(self, request: str) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def measure(args: argparse.Namespace, contenders: list[Contender]) -> dict[tuple[int, str], float]:
    """(batch size, contender name) -> median seconds per batch over the alternating rounds."""
    children = {contender.name: Child(contender, args) for contender in contenders}
    try:
        samples: dict[tuple[int, str], list[float]] = {}
        for batch_size in args.batch_sizes:
            for round_index in range(args.rounds):
                for name, child in children.items():
                    time.sleep(SETTLE_SECONDS)
                    seconds = child.ask(str(batch_size))
                    samples.setdefault((batch_size, name), []).append(seconds)
                print(f"batch {batch_size}: round {round_index + 1}/{args.rounds}", file=sys.stderr)
        flops = children[BASELINE.name].ask("flops")
    finally:
        for child in children.values():
            child.close()
    medians = {key: statistics.median(values) for key, values in samples.items()}
    medians[(0, "flops")] = flops
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="d1")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bfloat16", action="store_true", help="time both in bfloat16 too")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    add_load_arguments(parser)
    args = parser.parse_args()
    if args.serve:
        framework, dtype = args.serve.split(":")
        serve(Contender(framework, dtype), args.variant, args.image_size, args.threads)
        return
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")

    load = require_quiet(args)
    dtypes = ("float32", "bfloat16") if args.bfloat16 else ("float32",)
    contenders = [Contender(framework, dtype) for dtype in dtypes for framework in FRAMEWORKS]
    rates = matmul_rates(args.threads, dtypes)
    medians = measure(args, contenders)
    flops = medians.pop((0, "flops"))

    from volo_convert.environment import environment_line

    print(load.note() + f"; {os.getloadavg()[0]:.2f} at the end")
    print(f"environment: {environment_line()}")
    print(limit_line(rates))
    print(
        f"VOLO {args.variant} at {args.image_size}px: {flops / 1e9:.2f} GFLOP per image "
        f"(matmul and convolution, counted from the model); {args.threads} threads; "
        f"median of {args.rounds} alternating rounds, each contender in its own process"
    )
    print()
    print(
        "| batch | contender | median s/batch | images/s | GFLOP/s | % of its matmul rate "
        "| time vs PyTorch float32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        baseline = medians[(batch_size, BASELINE.name)]
        for contender in contenders:
            seconds = medians[(batch_size, contender.name)]
            gflops = flops * batch_size / seconds / 1e9
            print(
                f"| {batch_size} | {contender.name} | {seconds:.4f} | {batch_size / seconds:.1f} "
                f"| {gflops:.0f} | {100 * gflops / rates[contender.rate_key]:.0f}% "
                f"({contender.rate_key}) | {seconds / baseline:.2f}x |"
            )


if __name__ == "__main__":
    main()
