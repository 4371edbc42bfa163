"""Inference speed of the converted VOLO against PyTorch and ONNX Runtime, beside matmul rates.

Contenders, all built from the same synthetic release-format weights:

- PyTorch float32 (`inference_mode`), the baseline every time ratio is against;
- the Keras model in float32 (with --bfloat16 also PyTorch under bfloat16 autocast and Keras
  built with `compute_dtype="bfloat16"`);
- ONNX Runtime: the PyTorch reference exported with torch's dynamo exporter (opset 18, dynamic
  batch dimension), run in onnxruntime's CPU provider with --threads intra-op threads;
- TFLite float32: the Keras model converted by the project (its file takes batch 1), or the
  float32 file given by --tflite-file, run under LiteRT with --threads threads; it is timed at
  the batch sizes its input signature takes.

ONNX Runtime and LiteRT are benchmark dependencies, not runtime ones: `pip install torch==2.13.0
'.[bench]'` in the checkout installs them (or leave them out with --contenders).

Each contender lives in its own process and builds its model once. Before anything is timed,
each one's logits are compared with the PyTorch reference's on the same seeded images; a float32
contender outside the project's float32 bar (DEFAULT_ATOL) is not timed, and the run exits 1.
The driver then asks the contenders in turn, round after round, to time one batch, so a
neighbour's load hits every contender alike, and reports the median over the rounds. Beside
each time: the GFLOP/s it achieves (matmul and convolution FLOPs counted from the model by
torch's FlopCounterMode, per image, at this resolution) and that rate as a share of its own
framework's large-matmul rate, measured in the same run (scripts/quiet_machine.py), so every
ratio has the machine's limit next to it.

    python scripts/bench_inference.py --variant d1 --image-size 224 --batch-sizes 1 8 --threads 2
    python scripts/bench_inference.py --variant d1 --image-size 224 --batch-sizes 8 --bfloat16
    python scripts/bench_inference.py --variant d3 --image-size 448 --batch-sizes 1 \
        --contenders keras
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_contenders import (
    BASELINE,
    FRAMEWORKS,
    PARITY_IMAGES,
    TIMING_SEED,
    Contender,
    Setup,
    flops_per_image,
    max_abs_diff,
)
from quiet_machine import add_load_arguments, limit_line, matmul_rates, require_quiet

MIN_ROUNDS = 5
WARMUP_CALLS = 2
SETTLE_SECONDS = 0.2  # pause between contenders, so one's spinning threads do not slow the next
ANY_BATCH = "any"  # what a child answers when its model takes every batch size
EXIT_MISMATCH = 1  # a contender's logits did not match the reference: it was not timed
EXIT_USAGE = 2  # a contender's benchmark dependencies are not installed
INSTALL_HINT = (
    "pip install torch==2.13.0 '.[bench]' in the checkout (torch pinned, so that pip keeps "
    "the CPU wheel)"
)


def serve(contender: Contender, args: argparse.Namespace) -> None:
    """Child process: builds the model, then answers one request per line read from stdin:
    a batch size (seconds for one batch), `parity` (max abs diff against the reference) or
    `flops` (per image)."""
    # The answers go to the real stdout; what libraries print (the ONNX exporter, the TFLite
    # converter) goes to stderr, where it cannot be taken for an answer.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    # TensorFlow's threads are set first, before torch is imported, as in a Keras server.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import torch

    from volo_convert.architecture.variants import VARIANTS
    from volo_convert.checks.images import sample_images
    from volo_convert.checks.reference import build_reference
    from volo_convert.synthetic import make_state_dict

    torch.set_num_threads(args.threads)
    config = VARIANTS[args.variant]
    state_dict = make_state_dict(config, args.image_size)
    reference = build_reference(config, args.image_size, state_dict, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="volo-bench-") as workdir:
        setup = Setup(
            config,
            args.image_size,
            state_dict,
            reference,
            args.threads,
            Path(workdir),
            args.tflite_file,
        )
        runner = FRAMEWORKS[contender.framework].build(contender.dtype, setup)
        print(f"ready {runner.batch_size or ANY_BATCH}", file=answers)
        batches: dict[int, Any] = {}
        for request in sys.stdin:
            if request.strip() == "flops":
                print(flops_per_image(setup), file=answers)
                continue
            if request.strip() == "parity":
                print(max_abs_diff(runner, setup), file=answers)
                continue
            batch_size = int(request)
            if batch_size not in batches:
                batches[batch_size] = sample_images(batch_size, args.image_size, seed=TIMING_SEED)
                for _ in range(WARMUP_CALLS):
                    runner.call(batches[batch_size])
            started = time.perf_counter()
            runner.call(batches[batch_size])
            print(time.perf_counter() - started, file=answers)


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
        if args.tflite_file is not None:
            command += ["--tflite-file", str(args.tflite_file)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.name = contender.name
        ready, _, batch_size = self._read().partition(" ")
        if ready != "ready":
            raise SystemExit(f"{contender.name}: its process failed to start (its error above)")
        self.batch_size = None if batch_size == ANY_BATCH else int(batch_size)

    def _read(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def takes(self, batch_size: int) -> bool:
        """Whether the contender's model takes batches of `batch_size`."""
        return self.batch_size in (None, batch_size)

    def ask(self, request: str) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        answer = self._read()
        if not answer:
            raise SystemExit(f"{self.name}: its process stopped at {request!r} (its error above)")
        return float(answer)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


@dataclass(frozen=True)
class Measurement:
    """What one run found: medians, the model's FLOPs, parity, and what was left out."""

    medians: dict[tuple[int, Contender], float]  # median seconds per batch
    flops: float  # per image
    diffs: dict[Contender, float]  # max abs diff against the reference, each non-baseline
    mismatched: list[Contender]  # outside the bar: not timed
    batch_sizes: dict[Contender, int | None]  # the only batch a contender takes; None: any


def parity_bar(contender: Contender) -> float | None:
    """The max abs diff a contender must stay within to be timed; None: no bar (bfloat16)."""
    from volo_convert.options import default_atol

    return default_atol(contender.dtype) if contender.dtype == "float32" else None


def measure(args: argparse.Namespace, contenders: list[Contender]) -> Measurement:
    """Starts the contenders, checks their parity, then times them in alternating rounds."""
    children: dict[Contender, Child] = {}
    try:
        for contender in contenders:
            children[contender] = Child(contender, args)
        diffs = {
            contender: child.ask("parity")
            for contender, child in children.items()
            if contender != BASELINE
        }
        mismatched = [
            contender
            for contender, diff in diffs.items()
            if (bar := parity_bar(contender)) is not None and not diff <= bar
        ]
        timed = {
            contender: child for contender, child in children.items() if contender not in mismatched
        }
        samples: dict[tuple[int, Contender], list[float]] = {}
        for batch_size in args.batch_sizes:
            for round_index in range(args.rounds):
                for contender, child in timed.items():
                    if child.takes(batch_size):
                        time.sleep(SETTLE_SECONDS)
                        seconds = child.ask(str(batch_size))
                        samples.setdefault((batch_size, contender), []).append(seconds)
                print(f"batch {batch_size}: round {round_index + 1}/{args.rounds}", file=sys.stderr)
        flops = children[BASELINE].ask("flops")
    finally:
        for child in children.values():
            child.close()
    return Measurement(
        {key: statistics.median(values) for key, values in samples.items()},
        flops,
        diffs,
        mismatched,
        {contender: child.batch_size for contender, child in children.items()},
    )


def require_packages(frameworks: list[str]) -> None:
    """Exits with EXIT_USAGE, saying how to install them, if a framework's packages are missing."""
    for framework in frameworks:
        missing = []
        for package in FRAMEWORKS[framework].packages:
            try:
                importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                missing.append(package)
        if missing:
            others = [other for other in frameworks[1:] if other != framework]
            print(
                f"Error: {FRAMEWORKS[framework].names['float32']} needs {', '.join(missing)}, "
                f"which is not installed. The benchmark's own dependencies install with "
                f"{INSTALL_HINT}; or leave it out: --contenders {' '.join(others) or 'keras'}",
                file=sys.stderr,
            )
            sys.exit(EXIT_USAGE)


def dependency_line(frameworks: list[str]) -> str:
    """The versions of the benchmark dependencies in use, in one line."""
    packages = [package for framework in frameworks for package in FRAMEWORKS[framework].packages]
    shown = ", ".join(f"{package} {importlib.metadata.version(package)}" for package in packages)
    return f"benchmark dependencies: {shown or 'none'}"


def parity_line(measurement: Measurement) -> str:
    """Each contender's max abs diff against the reference, with its bar."""
    shown = []
    for contender, diff in measurement.diffs.items():
        bar = parity_bar(contender)
        verdict = (
            "no bar"
            if bar is None
            else "NOT TIMED"
            if contender in measurement.mismatched
            else "ok"
        )
        shown.append(f"{contender.name} {diff:.2e} ({verdict})")
    return (
        f"parity against the PyTorch reference, max abs diff of the logits on "
        f"{PARITY_IMAGES} seeded images (a batch-N file: N), float32 bar "
        f"{parity_bar(BASELINE):.0e}: {', '.join(shown)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="d1")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--bfloat16", action="store_true", help="time PyTorch and Keras in bfloat16 too"
    )
    others = [framework for framework in FRAMEWORKS if framework != BASELINE.framework]
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=others,
        default=others,
        help="who runs beside PyTorch float32 (default: all; onnxruntime and tflite need the "
        "`bench` extra)",
    )
    parser.add_argument(
        "--tflite-file",
        type=Path,
        help="a float32 TFLite file of the same synthetic checkpoint to time (e.g. one that "
        "takes a batch), instead of the batch-1 file converted here",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    add_load_arguments(parser)
    args = parser.parse_args()
    if args.serve:
        framework, dtype = args.serve.split(":")
        serve(Contender(framework, dtype), args)
        return
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    if args.tflite_file is not None:
        args.tflite_file = args.tflite_file.resolve()
        if not args.tflite_file.is_file():
            parser.error(f"--tflite-file {args.tflite_file}: no such file")
    frameworks = [BASELINE.framework, *(f for f in others if f in args.contenders)]
    require_packages(frameworks)

    load = require_quiet(args)
    dtypes = ("float32", "bfloat16") if args.bfloat16 else ("float32",)
    contenders = [
        Contender(framework, dtype)
        for dtype in dtypes
        for framework in frameworks
        if dtype in FRAMEWORKS[framework].names
    ]
    rate_frameworks = tuple(dict.fromkeys(FRAMEWORKS[f].rate_framework for f in frameworks))
    rates = matmul_rates(args.threads, dtypes, rate_frameworks)
    measurement = measure(args, contenders)

    from volo_convert.environment import environment_line

    print(load.note() + f"; {os.getloadavg()[0]:.2f} at the end")
    print(f"environment: {environment_line()}")
    print(dependency_line(frameworks))
    print(limit_line(rates))
    print(
        f"VOLO {args.variant} at {args.image_size}px: {measurement.flops / 1e9:.2f} GFLOP per "
        f"image (matmul and convolution, counted from the model); {args.threads} threads; "
        f"median of {args.rounds} alternating rounds, each contender in its own process"
    )
    print(parity_line(measurement))
    print()
    print(
        "| batch | contender | median s/batch | images/s | GFLOP/s | % of its matmul rate "
        "| time vs PyTorch float32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        baseline = measurement.medians[(batch_size, BASELINE)]
        for contender in contenders:
            if contender in measurement.mismatched:
                print(
                    f"| {batch_size} | {contender.name} | not timed: logits do not match | | | | |"
                )
                continue
            if (batch_size, contender) not in measurement.medians:
                only = f"its file takes batch {measurement.batch_sizes[contender]} only"
                print(f"| {batch_size} | {contender.name} | {only} | | | | |")
                continue
            seconds = measurement.medians[(batch_size, contender)]
            gflops = measurement.flops * batch_size / seconds / 1e9
            print(
                f"| {batch_size} | {contender.name} | {seconds:.4f} | {batch_size / seconds:.1f} "
                f"| {gflops:.0f} | {100 * gflops / rates[contender.rate_key]:.0f}% "
                f"({contender.rate_key}) | {seconds / baseline:.2f}x |"
            )
    if measurement.mismatched:
        names = ", ".join(contender.name for contender in measurement.mismatched)
        print(f"not timed, logits outside the bar: {names}", file=sys.stderr)
        sys.exit(EXIT_MISMATCH)


if __name__ == "__main__":
    main()
