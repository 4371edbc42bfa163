"""TFLite files that take a batch, side by side: latency per image and XNNPACK's share.

Writes a synthetic release-format checkpoint of VARIANT at --image-size, converts it to
float32 TFLite files of batch 1, of --batch N and `dynamic` (unverified: `volo-convert`
verifies them), loads each in LiteRT with --threads threads (XNNPACK, its default
delegate), and then:

- XNNPACK coverage: the nodes the delegate took out of all nodes, and in how many
  partitions (`formats.tflite_delegates.xnnpack_coverage`, as every file's delegate report);
- latency per image: each round runs N images through every contender in turn, the
  batch-1 file as N invocations, the batch-N and dynamic files as one; the median over
  rounds is reported, with the 1-minute load average at start and end (the machine is
  shared: read ratios, not absolute times).

Usage:
    python scripts/bench_tflite_batch.py --variant d1 --image-size 224 --batch 8 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from volo_convert.compat import interpreter_nodes
from volo_convert.formats import tflite_delegates
from volo_convert.formats.tflite_delegates import nodes_run_alone


def xnnpack_coverage(interpreter: Any) -> tuple[int, int, int]:
    """(nodes XNNPACK runs, all nodes, partitions), printing the operators it leaves out."""
    operators = interpreter_nodes(interpreter)
    outputs = [details["index"] for details in interpreter.get_output_details()]
    alone = nodes_run_alone(operators, outputs)
    if alone:
        print(f"  run outside XNNPACK: {sorted({op['op_name'] for op in alone})}")
    return tflite_delegates.xnnpack_coverage(operators, outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="d1")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from ai_edge_litert.interpreter import Interpreter

    from volo_convert.architecture.variants import VARIANTS
    from volo_convert.options import ConvertOptions
    from volo_convert.pipeline import convert
    from volo_convert.synthetic import write_checkpoint

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-tflite-batch-"))
    workdir.mkdir(exist_ok=True)
    checkpoint = workdir / f"{args.variant}_{args.image_size}.pth.tar"
    if not checkpoint.exists():
        write_checkpoint(checkpoint, VARIANTS[args.variant], args.image_size, seed=0)
    batches: list[int | str] = [1, args.batch, "dynamic"]
    interpreters = {}
    for batch in batches:
        path = workdir / f"{args.variant}_{args.image_size}_b{batch}.tflite"
        if not path.exists():
            started = time.perf_counter()
            convert(checkpoint, path, ConvertOptions(tflite_batch=batch, verify=False))
            print(f"converted batch {batch} in {time.perf_counter() - started:.0f}s")
        interpreter = Interpreter(model_path=str(path), num_threads=args.threads)
        details = interpreter.get_input_details()[0]
        if batch == "dynamic":
            interpreter.resize_tensor_input(details["index"], [args.batch, *details["shape"][1:]])
        interpreter.allocate_tensors()
        print(f"batch {batch}: {path.stat().st_size / 1e6:.1f} MB")
        delegated, nodes, partitions = xnnpack_coverage(interpreter)
        print(f"  XNNPACK: {delegated} of {nodes} nodes, {partitions} partition(s)")
        interpreters[batch] = (interpreter, details["index"])

    size = args.image_size
    images = np.random.default_rng(0).normal(size=(args.batch, size, size, 3)).astype(np.float32)

    def run_once(batch: int | str) -> None:
        interpreter, index = interpreters[batch]
        chunks = [images[i : i + 1] for i in range(args.batch)] if batch == 1 else [images]
        for chunk in chunks:
            interpreter.set_tensor(index, chunk)
            interpreter.invoke()

    for batch in batches:  # warm-up
        run_once(batch)
    load_start = os.getloadavg()[0]
    times: dict[int | str, list[float]] = {batch: [] for batch in batches}
    for round_index in range(args.rounds):
        order = batches if round_index % 2 == 0 else batches[::-1]  # alternate who goes first
        for batch in order:
            started = time.perf_counter()
            run_once(batch)
            times[batch].append((time.perf_counter() - started) / args.batch)
    load_end = os.getloadavg()[0]
    print(
        f"\n{args.variant} at {size}px, LiteRT, {args.threads} threads, {args.batch} images per "
        f"round, medians of {args.rounds} rounds; 1-minute load average {load_start:.2f} at "
        f"start, {load_end:.2f} at end, {os.cpu_count()} CPUs"
    )
    base = statistics.median(times[1])
    print("| file | ms per image (median) | min | vs batch-1 file |")
    print("|---|---|---|---|")
    for batch in batches:
        median = statistics.median(times[batch])
        print(
            f"| `--tflite-batch {batch}` | {median * 1e3:.1f} | {min(times[batch]) * 1e3:.1f} | "
            f"{median / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
