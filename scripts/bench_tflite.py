"""TFLite speed and size, side by side: float32, float16, int8-dynamic, int8 and PyTorch.

Converts CHECKPOINT to the four TFLite dtypes (unverified; `volo-convert` verifies them),
then measures, on batch 1 and for each thread count:

- latency: one process holds every interpreter (LiteRT where installed, with XNNPACK, its
  default delegate) and the PyTorch reference; after warm-up calls, each round times every
  contender once in turn, and the median over rounds is reported;
- peak memory at load: in a fresh process per file, the rise of peak RSS across creating
  the interpreter and allocating its tensors.

A figure from a busy machine is not a result: the 1-minute load average is recorded at the
start and the run is refused above --max-load (0.5 on 2 cores) unless --allow-busy, in
which case the table is headed as taken on a busy machine (scripts/quiet_machine.py).

Usage:
    volo-convert synthesize release --only d1_224_84.2.pth.tar
    python scripts/bench_tflite.py release/d1_224_84.2.pth.tar --workdir bench-tflite \\
        --threads 1 2 --rounds 20 --markdown bench-tflite/tflite.md
"""

from __future__ import annotations

import argparse
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
DTYPES = ("float32", "float16", "int8-dynamic", "int8")


def tflite_path(workdir: Path, dtype: str) -> Path:
    return workdir / f"model_{dtype}.tflite"


def convert_all(checkpoint: Path, workdir: Path) -> None:
    """Writes every TFLite dtype not there yet (int8 on the default calibration set)."""
    from volo_convert.options import ConvertOptions
    from volo_convert.pipeline import convert

    for dtype in DTYPES:
        path = tflite_path(workdir, dtype)
        if not path.exists():
            print(f"converting to {path.name}", file=sys.stderr)
            convert(checkpoint, path, ConvertOptions(tflite_dtype=dtype, verify=False))


def interpreter(path: Path, threads: int):
    """The interpreter the project verifies in (LiteRT if installed), XNNPACK by default."""
    from volo_convert.formats.tflite import TFLiteRunner

    return TFLiteRunner(path, num_threads=threads)


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def load_memory(path: Path, threads: int) -> float:
    """MiB by which peak RSS rises above the current RSS while the file is loaded.

    The libraries are imported first and the peak is reset (clear_refs 5), so only the
    interpreter, the model and its allocated tensors count, not the imports' own peak.
    """
    from volo_convert.formats.tflite import TFLiteRunner

    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mib("VmRSS")
    TFLiteRunner(path, num_threads=threads)
    return _status_mib("VmHWM") - before


def memory_in_subprocess(path: Path, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, __file__, "--memory", str(path), "--threads", str(threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    reports = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(reports[-1])["load_mib"]


def latencies(checkpoint: Path, workdir: Path, threads: int, rounds: int) -> dict[str, float]:
    """Median batch-1 latency in ms of each TFLite file and of PyTorch, alternating rounds."""
    import torch

    from volo_convert.checks.images import normalize, sample_pixels
    from volo_convert.checks.reference import build_reference
    from volo_convert.options import ConvertOptions
    from volo_convert.weights.loading import load_checkpoint

    torch.set_num_threads(threads)
    loaded = load_checkpoint(checkpoint, ConvertOptions())
    reference = build_reference(
        loaded.config, loaded.image_size, loaded.state_dict, torch.device("cpu")
    )
    images = normalize(sample_pixels(1, loaded.image_size, seed=3))
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)  # 1, 3, S, S

    def run_torch() -> None:
        with torch.inference_mode():
            reference(batch)

    contenders = {"PyTorch (inference_mode)": run_torch}
    for dtype in DTYPES:
        runner = interpreter(tflite_path(workdir, dtype), threads)
        contenders[f"TFLite {dtype}"] = lambda runner=runner: runner.predict_on_batch(images)
    for run in contenders.values():
        for _ in range(3):
            run()
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in timings.items()}


def markdown(rows: list[dict], args: argparse.Namespace, load: Load) -> str:
    from volo_convert.environment import environment_line
    from volo_convert.formats.tflite import interpreter_name

    heading = f"**{load.note()}.**" if load.busy else f"{load.note()}."
    lines = [
        heading,
        f"Checkpoint `{args.checkpoint.name}`, batch 1, median of {args.rounds} alternating "
        f"rounds; TFLite in {interpreter_name()} (XNNPACK).",
        f"Environment: {environment_line()}.",
        "",
        "| threads | model | file size | peak RSS at load | latency | vs TFLite float32 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['threads']} | {row['model']} | {row['size']} | {row['memory']} | "
            f"{row['latency']:.0f} ms | {row['ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?")
    parser.add_argument("--workdir", type=Path, default=Path("bench-tflite"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    add_load_arguments(parser)
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--memory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory is not None:
        print(json.dumps({"load_mib": load_memory(args.memory, args.threads[0])}))
        return
    if args.checkpoint is None:
        parser.error("the checkpoint is required")

    load = require_quiet(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    convert_all(args.checkpoint, args.workdir)
    rows = []
    for threads in args.threads:
        print(f"timing at {threads} threads", file=sys.stderr)
        timings = latencies(args.checkpoint, args.workdir, threads, args.rounds)
        float32_ms = timings["TFLite float32"]
        for name, latency in timings.items():
            dtype = name.removeprefix("TFLite ")
            is_tflite = dtype in DTYPES
            path = tflite_path(args.workdir, dtype)
            rows.append(
                {
                    "threads": threads,
                    "model": name,
                    "size": f"{path.stat().st_size / 2**20:.1f} MiB" if is_tflite else "-",
                    "memory": (
                        f"{memory_in_subprocess(path, threads):.0f} MiB" if is_tflite else "-"
                    ),
                    "latency": latency,
                    "ratio": latency / float32_ms,
                }
            )
    table = markdown(rows, args, load)
    print(table)
    print(json.dumps({"load_average": load.average, "busy": load.busy}), file=sys.stderr)
    if args.markdown is not None:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
