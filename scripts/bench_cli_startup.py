"""How fast the command line answers: `--help`, `--version` and `inspect`, each a whole process.

Each case is `python -m volo_convert ARGS` started afresh, timed from start to exit (the
interpreter's own start included), best of `--rounds`; `python -c pass` is measured the
same way beside them, the floor no command can go under. Children run with `python -P`, so
the working folder is not put on their path: the package measured is the one this script
imports too, this checkout's with `PYTHONPATH=.`, another with another path, else the
installed one.

    volo-convert synthesize ckpt/ --variants d1 --image-size 224
    volo-convert ckpt/d1_224_84.2.pth.tar -o d1.h5      # and d1.keras, d1.tflite, d1_savedmodel/
    PYTHONPATH=. python scripts/bench_cli_startup.py d1.h5 d1.keras d1.tflite d1_savedmodel/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quiet_machine import add_load_arguments, measure, require_quiet

from volo_convert.cli import cli
from volo_convert.environment import environment_line

DEFAULT_ROUNDS = 5
HELP_SECONDS, INSPECT_SECONDS = 0.5, 1.0  # issue 21's bars, whole process


CLI = ["-P", "-m", "volo_convert"]  # `volo-convert`, from the package on PYTHONPATH


def cases(models: list[Path]) -> dict[str, tuple[list[str], float | None]]:
    """Case name -> (arguments after `python`, the bar it must stay under or None)."""
    found: dict[str, tuple[list[str], float | None]] = {}
    found["python -c pass"] = (["-P", "-c", "pass"], None)
    found["volo-convert --version"] = ([*CLI, "--version"], HELP_SECONDS)
    found["volo-convert --help"] = ([*CLI, "--help"], HELP_SECONDS)
    for command in sorted(cli.commands):
        found[f"volo-convert {command} --help"] = ([*CLI, command, "--help"], HELP_SECONDS)
    for model in models:
        found[f"volo-convert inspect {model.name}"] = (
            [*CLI, "inspect", str(model)],
            INSPECT_SECONDS,
        )
    return found


def best_seconds(arguments: list[str], rounds: int) -> float:
    """The fastest of `rounds` runs of `python ARGUMENTS`, in wall seconds."""
    return min(measure([sys.executable, *arguments])[0] for _ in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="files and folders to inspect")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    add_load_arguments(parser)
    args = parser.parse_args()
    load = require_quiet(args)
    measured = {
        name: (best_seconds(arguments, args.rounds), bar)
        for name, (arguments, bar) in cases(args.models).items()
    }
    floor = measured["python -c pass"][0]
    print(f"environment: {environment_line()}")
    print(load.note())
    package = Path(sys.modules["volo_convert"].__file__ or "").parent
    print(f"package measured: {package}; best of {args.rounds} runs, each a whole process\n")
    print("| command | best s | above `python -c pass` s | bar s |")
    print("|---|---|---|---|")
    for name, (seconds, bar) in measured.items():
        bar_text = "" if bar is None else f"{bar:g}" + ("" if seconds <= bar else " (OVER)")
        print(f"| `{name}` | {seconds:.3f} | {seconds - floor:.3f} | {bar_text} |")


if __name__ == "__main__":
    main()
