"""What the one pass over a checkpoint costs (SHA-256 and zip CRCs), beside reading it.

Alternates, in one process, a plain chunked read of the file and the pass that
volo-convert runs before loading (weights/checkpoint.py: the file's SHA-256 and every zip
record's CRC-32), and reports the medians with the machine's load average. Both read from
the page cache after the first round.

    python scripts/bench_crc.py CHECKPOINT --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from quiet_machine import add_load_arguments, require_quiet

from volo_convert.environment import environment_line
from volo_convert.paths import HASH_CHUNK_BYTES
from volo_convert.weights.file_scan import scan_file


def plain_read(path: Path) -> None:
    """Reads every byte, in the chunks the scan uses."""
    buffer = bytearray(HASH_CHUNK_BYTES)
    with path.open("rb", buffering=0) as stream:
        while stream.readinto(buffer):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    add_load_arguments(parser)
    args = parser.parse_args()
    load = require_quiet(args)
    passes = {
        "plain read": plain_read,
        "SHA-256 + CRC pass": lambda path: scan_file(path, zip_container=True),
    }
    timings: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.rounds):
        for name, run in passes.items():
            started = time.perf_counter()
            run(args.checkpoint)
            timings[name].append(time.perf_counter() - started)
    size = args.checkpoint.stat().st_size
    print(f"environment: {environment_line()}")
    print(load.note())
    print(f"{args.checkpoint.name}: {size / 1e9:.2f} GB, median of {args.rounds} rounds\n")
    print("| pass | median s | GB/s |")
    print("|---|---|---|")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {size / median / 1e9:.2f} |")


if __name__ == "__main__":
    main()
