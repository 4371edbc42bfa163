"""The whole release: synthetic checkpoints for all eleven names, batch-converted and verified.

Writes the checkpoints if missing (`volo-convert synthesize`, about 6.5 GB), checks that the
machine is quiet (quiet_machine.py), measures the I/O floor of each file (imports, torch.load,
an h5py write of the same tensors, each in a fresh process as the batch's workers are), runs
`volo-convert batch` on them in a fresh output folder (`--force`), then prints the
per-checkpoint conversion and verification cost from its report.json, and the totals.

    python scripts/bench_release.py --checkpoints /tmp/release --out /tmp/release-keras
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quiet_machine import add_load_arguments, io_floor_command, measure, require_quiet

from volo_convert.batch.runner import find_checkpoints
from volo_convert.environment import environment_line

MEGABYTE = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    add_load_arguments(parser)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cli = [sys.executable, "-m", "volo_convert"]

    subprocess.run([*cli, "synthesize", str(args.checkpoints)], check=True)
    load = require_quiet(args)
    with tempfile.TemporaryDirectory() as workdir:
        floor_output = Path(workdir) / "floor.h5"
        floor_seconds = sum(
            measure(io_floor_command(checkpoint, floor_output))[0]
            for checkpoint in find_checkpoints([args.checkpoints])
        )
    started = time.perf_counter()
    batch_args = ["batch", str(args.checkpoints), "-o", str(args.out), "--device", args.device]
    batch = subprocess.Popen([*cli, *batch_args, "--force"])
    _, status, _ = os.wait4(batch.pid, 0)
    wall_seconds = time.perf_counter() - started
    report = json.loads((args.out / "report.json").read_text())

    print()
    print(load.note())
    print(f"environment: {environment_line()}; default threads")
    print()
    print(
        "| checkpoint | parameters | convert s | verify s | peak RSS MB | max abs diff | status |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in report["checkpoints"]:
        peak = row["peak_rss_bytes"]
        print(
            f"| {row['file']} | {row['parameters'] or 0:,} | {row['convert_seconds'] or 0:.1f} | "
            f"{row['verify_seconds'] or 0:.1f} | {(peak or 0) / MEGABYTE:,.0f} | "
            f"{row['max_abs_diff'] or 0:.3g} | "
            f"{row['status']} |"
        )
    summary = report["summary"]
    print()
    print(
        f"batch exit code {os.waitstatus_to_exitcode(status)}; total wall time "
        f"{wall_seconds / 60:.1f} min; largest per-file peak RSS "
        f"{summary['largest_peak_rss_bytes'] / MEGABYTE:,.0f} MB; batch driver peak RSS "
        f"{summary['driver_peak_rss_bytes'] / MEGABYTE:,.0f} MB; worst max abs diff "
        f"{summary['worst_max_abs_diff']:.3g}"
    )
    print(
        f"I/O floor (imports, torch.load and an h5py write of each file, one process each): "
        f"{floor_seconds / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
