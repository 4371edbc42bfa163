"""How the commands show their stages on stderr: a line per finished stage, a live line on a TTY."""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

from volo_convert.errors import one_line

if TYPE_CHECKING:
    from tqdm import tqdm

REFRESH_SECONDS = 0.2  # how often the live line's clock moves


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f}s"


class StageDisplay:
    """Shows the pipeline's stages as they pass; call it with each stage's name as it starts.

    Every finished stage prints one line with its duration, in a log and on a terminal
    alike, so both read the same. On a terminal, one live status line below them shows
    the running stage and its elapsed time, drawn by tqdm and cleared at the end.
    `label` goes before each stage's name (a batch sets it to the file in hand), `counter`
    into the live line (`file 2 of 11`).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.label = ""
        self.counter = ""
        self.stage: str | None = None
        self._started = self._stage_started = time.perf_counter()
        self._bar: tqdm | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.stream.isatty():
            from tqdm import tqdm  # here, not at the top: `--help` need not import it

            self._bar = tqdm(bar_format="{desc}", file=self.stream, leave=False, dynamic_ncols=True)
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    @property
    def elapsed(self) -> float:
        """Seconds since the display was opened."""
        return time.perf_counter() - self._started

    def __call__(self, stage: str) -> None:
        """Ends the running stage, if any, and starts `stage`."""
        self.finish()
        self.stage = stage
        self._stage_started = time.perf_counter()
        self._refresh()

    def finish(self) -> None:
        """Ends the running stage, printing its line with its duration."""
        if self.stage is not None:
            seconds = time.perf_counter() - self._stage_started
            self.write(f"{self.label}{self.stage:<11}{_seconds(seconds):>7}")
            self.stage = None
            self._refresh()

    def write(self, line: str) -> None:
        """Prints `line` above the live status line, as one line (file names escaped)."""
        line = one_line(line)
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def warn(self, message: str) -> None:
        """Prints a one-line warning."""
        self.write(f"Warning: {message}")

    def close(self, finished: bool = True) -> None:
        """Ends the display; `finished` False leaves a failed stage without its line."""
        if finished:
            self.finish()
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> StageDisplay:
        return self

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(finished=error is None)

    def _status(self) -> str:
        """The live line: the running stage, its elapsed time, and the whole run's."""
        total = f"{self.counter}, {_seconds(self.elapsed)} in all".lstrip(", ")
        if self.stage is None:
            return f"{self.label}({total})"
        seconds = time.perf_counter() - self._stage_started
        return f"{self.label}{self.stage} {_seconds(seconds)}  ({total})"

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.set_description_str(self._status())

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            self._refresh()
