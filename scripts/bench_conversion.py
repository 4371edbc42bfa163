"""Cost of a conversion (no verification) against the floor any converter must pay.

The floor is a fresh Python that imports torch, tensorflow and keras, reads the checkpoint
with `torch.load` and writes the same tensors with h5py. Floor and converter run in turn
as child processes (alternating, so load on a shared machine hits both alike); each
child's wall time and peak RSS come from `os.wait4`, so they are that process's own.
The peak of the imports alone is measured too: what a converter holds above it, divided
by the checkpoint's size, is the number of copies of the weights at its worst moment.

    python scripts/bench_conversion.py CHECKPOINT [CHECKPOINT ...] --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from volo_convert.environment import environment_line

FLOOR_PROGRAM = """
import sys
import h5py, keras, tensorflow, torch
state_dict = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
with h5py.File(sys.argv[2], "w") as output:
    for name, tensor in state_dict.items():
        output.create_dataset(name, data=tensor.numpy())
"""
IMPORTS_PROGRAM = "import h5py, keras, tensorflow, torch"
MEGABYTE = 1024 * 1024


def measure(command: list[str]) -> tuple[float, int]:
    """Runs `command`; returns its wall seconds and its peak RSS in bytes."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    print(f"environment: {environment_line()}; median of {args.runs} alternating runs")
    print()
    print(
        "| checkpoint | size MB | floor s | convert s | time vs floor | floor peak MB "
        "| imports peak MB | convert peak MB | convert peak vs size | copies held |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        output = Path(workdir) / "out.h5"
        for checkpoint in args.checkpoints:
            commands = {
                "imports": [sys.executable, "-c", IMPORTS_PROGRAM],
                "floor": [sys.executable, "-c", FLOOR_PROGRAM, str(checkpoint), str(output)],
                "convert": [
                    sys.executable,
                    "-m",
                    "volo_convert",
                    str(checkpoint),
                    "-o",
                    str(output),
                    "--no-verify",
                    "--overwrite",
                ],
            }
            samples: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, command in commands.items():
                    samples[name].append(measure(command))
            seconds = {
                name: statistics.median(run[0] for run in runs) for name, runs in samples.items()
            }
            peak = {
                name: statistics.median(run[1] for run in runs) for name, runs in samples.items()
            }
            size = checkpoint.stat().st_size
            print(
                f"| {checkpoint.name} | {size / MEGABYTE:,.0f} | {seconds['floor']:.1f} | "
                f"{seconds['convert']:.1f} | {seconds['convert'] / seconds['floor']:.2f}x | "
                f"{peak['floor'] / MEGABYTE:,.0f} | {peak['imports'] / MEGABYTE:,.0f} | "
                f"{peak['convert'] / MEGABYTE:,.0f} | {peak['convert'] / size:.2f}x | "
                f"{(peak['convert'] - peak['imports']) / size:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
