"""Cost of a conversion (no verification) against the floor any converter must pay.

The floor (quiet_machine.IO_FLOOR_PROGRAM) is a fresh Python that imports torch, tensorflow
and keras, reads the checkpoint with `torch.load` and writes the same tensors with h5py.
Floor and converter run in turn as child processes (alternating, so load on a shared machine
hits both alike); each child's wall time and peak RSS come from `os.wait4`, so they are that
process's own. The machine's 1-minute load average is checked first and printed above the
table (quiet_machine.py).
The peak of the imports alone is measured too: what a converter holds above it, divided
by the checkpoint's size, is the number of copies of the weights at its worst moment.

    python scripts/bench_conversion.py CHECKPOINT [CHECKPOINT ...] --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from quiet_machine import add_load_arguments, io_floor_command, measure, require_quiet

from volo_convert.environment import environment_line

IMPORTS_PROGRAM = "import h5py, keras, tensorflow, torch"
MEGABYTE = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    add_load_arguments(parser)
    args = parser.parse_args()
    load = require_quiet(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    print(load.note())
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
                "floor": io_floor_command(checkpoint, output),
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
