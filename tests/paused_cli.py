"""`volo-convert`, paused at one pipeline stage: how the signal tests stop a run where they choose.

`python tests/paused_cli.py ARGS` with PAUSE_AT=STAGE:FILE in the environment runs
`volo-convert ARGS`; the process that reaches STAGE writes its pid to FILE and waits for a
signal. A batch's worker is spawned from this script too (it runs it as `__mp_main__`), so
the pause is installed in the worker, not in the driver, which never runs a stage itself.
The pause wraps the pipeline's stage announcement (`stages.notify`) by monkeypatching;
the product holds no hook.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

PAUSE_VARIABLE = "PAUSE_AT"


def pause_at(stage: str, marker: Path) -> None:
    """Makes every pipeline module announce its stages through a pausing `notify`."""
    from volo_convert.pipeline import conversion, file_check, stages, verification

    announce = stages.notify

    def notify(on_stage: object, name: str) -> None:
        announce(on_stage, name)
        if name == stage:
            marker.write_text(str(os.getpid()))
            while True:
                signal.pause()

    for module in (conversion, file_check, verification):
        module.notify = notify


if PAUSE_VARIABLE in os.environ and (__name__ == "__mp_main__" or sys.argv[1:2] != ["batch"]):
    wanted, _, marker_path = os.environ[PAUSE_VARIABLE].partition(":")
    pause_at(wanted, Path(marker_path))

if __name__ == "__main__":
    from volo_convert.cli import main

    main()
