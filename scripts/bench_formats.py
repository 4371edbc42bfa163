"""Every output format of one checkpoint: file size, load time, inference time, parity.

Converts CHECKPOINT to each format (under TensorFlow), then measures each file in a fresh
process under the backend or runtime it is deployed with: load time (the file only, not
the library imports), median inference time on one image (batch 1) over --runs calls
after three warm-up calls, and the max abs logit difference from the PyTorch reference
on the verification images (seeded, --batch-size of them). It refuses to start on a busy
machine (scripts/quiet_machine.py) unless --allow-busy, which flags the table.

Usage:
    python scripts/bench_formats.py d1_224_84.2.pth.tar --workdir bench-formats \\
        --markdown bench-formats/formats.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from quiet_machine import Load, add_load_arguments, require_quiet

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
# (label, file name, format, tflite dtype, Keras backend that runs it)
ROWS = [
    (".h5", "model.h5", "h5", "float32", "tensorflow"),
    (".keras", "model.keras", "keras", "float32", "tensorflow"),
    (".keras, torch backend", "model.keras", "keras", "float32", "torch"),
    (".keras, jax backend", "model.keras", "keras", "float32", "jax"),
    ("SavedModel", "model_savedmodel", "savedmodel", "float32", "tensorflow"),
    ("TFLite float32", "model.tflite", "tflite", "float32", "tensorflow"),
    ("TFLite float16", "model_fp16.tflite", "tflite", "float16", "tensorflow"),
]


def size_bytes(path: Path) -> int:
    """A file's size, or the total size of a folder's files."""
    if path.is_dir():
        return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())
    return path.stat().st_size


def write_inputs(checkpoint: Path, workdir: Path, batch_size: int) -> None:
    """Saves the verification images and the PyTorch reference logits for them."""
    import numpy as np

    from volo_convert.checks.reference import run_reference
    from volo_convert.options import ConvertOptions
    from volo_convert.weights.loading import load_checkpoint

    loaded = load_checkpoint(checkpoint, ConvertOptions())
    reference = run_reference(
        loaded.config, loaded.image_size, loaded.state_dict, device="cpu", batch_size=batch_size
    )
    np.save(workdir / "images.npy", reference.images)
    np.save(workdir / "reference.npy", reference.outputs)


def convert_all(checkpoint: Path, workdir: Path) -> None:
    """Writes every format that is not there yet (unverified: the parity is measured later)."""
    from volo_convert.options import ConvertOptions
    from volo_convert.pipeline import convert

    for _, name, fmt, dtype, _ in ROWS:
        if not (workdir / name).exists():
            print(f"converting to {name}", file=sys.stderr)
            options = ConvertOptions(output_format=fmt, tflite_dtype=dtype, verify=False)
            convert(checkpoint, workdir / name, options)


def measure(path: Path, workdir: Path, runs: int, threads: int) -> dict[str, float]:
    """Load and inference figures for one file, in this process's backend."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    import keras

    from volo_convert.formats import TENSORFLOW_FORMATS, artifact_format, load_artifact
    from volo_convert.formats.tflite import TFLiteRunner

    fmt = artifact_format(path)
    if keras.backend.backend() == "tensorflow" or fmt in TENSORFLOW_FORMATS:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    images = np.load(workdir / "images.npy")
    reference = np.load(workdir / "reference.npy")
    started = time.perf_counter()
    model = TFLiteRunner(path, num_threads=threads) if fmt == "tflite" else load_artifact(path)
    load_seconds = time.perf_counter() - started
    for _ in range(3):
        model.predict_on_batch(images[:1])
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        keras.ops.convert_to_numpy(model.predict_on_batch(images[:1]))
        timings.append(time.perf_counter() - started)
    logits = np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(images)))
    return {
        "load_s": load_seconds,
        "infer_ms": 1000 * statistics.median(timings),
        "max_abs_diff": float(np.abs(logits.astype(np.float64) - reference).max()),
    }


def measure_in_subprocess(
    path: Path, backend: str, workdir: Path, runs: int, threads: int
) -> dict[str, float]:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, __file__, "--measure", str(path), "--workdir", str(workdir)]
    command += ["--runs", str(runs), "--threads", str(threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(
    rows: list[tuple[str, int, dict[str, float]]], args: argparse.Namespace, load: Load
) -> str:
    from volo_convert.environment import environment_line

    lines = [
        f"**{load.note()}.**" if load.busy else f"{load.note()}.",
        f"Checkpoint `{args.checkpoint.name}`, batch 1, {args.threads} threads, median of "
        f"{args.runs} runs; max abs diff over {args.batch_size} seeded images.",
        f"Environment: {environment_line()}.",
        "",
        "| format | file size | load time | inference time | max abs diff vs PyTorch |",
        "|---|---|---|---|---|",
    ]
    for label, size, figures in rows:
        lines.append(
            f"| {label} | {size / 2**20:.1f} MiB | {figures['load_s']:.2f} s | "
            f"{figures['infer_ms']:.0f} ms | {figures['max_abs_diff']:.2g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?")
    parser.add_argument("--workdir", type=Path, default=Path("bench-formats"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=2, help="images for the parity")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    add_load_arguments(parser)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.workdir, args.runs, args.threads)))
        return
    if args.checkpoint is None:
        parser.error("the checkpoint is required")

    load = require_quiet(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    write_inputs(args.checkpoint, args.workdir, args.batch_size)
    convert_all(args.checkpoint, args.workdir)
    rows = []
    for label, name, _, _, backend in ROWS:
        if backend == "jax" and importlib.util.find_spec("jax") is None:
            continue
        print(f"measuring {label}", file=sys.stderr)
        path = args.workdir / name
        figures = measure_in_subprocess(path, backend, args.workdir, args.runs, args.threads)
        rows.append((label, size_bytes(path), figures))
    table = markdown(rows, args, load)
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
