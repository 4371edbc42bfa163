"""What a user sees: the README's demo transcript, and the live status line on a terminal.

Both run the real command in a fresh process, in the environment a user's shell gives it.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from helpers import transcript, user_environment

pytestmark = pytest.mark.large  # each test runs the real command

VOLO_CONVERT = str(Path(sys.executable).with_name("volo-convert"))
NUMBER = re.compile(r"\d[\d,]*(\.\d+)?(e[-+]?\d+)?")
LIVE_LINE = re.compile(r"(\w+) (\d+\.\d)s  \((\d+\.\d)s in all\)")
TERMINAL_SIZE = struct.pack("HHHH", 24, 160, 0, 0)  # rows, columns, pixel sizes


def shape(line: str) -> str:
    """A line with every number replaced and every run of spaces made one: its shape."""
    return " ".join(NUMBER.sub("N", line).split())


def test_demo_prints_only_what_the_readme_shows(tmp_path: Path) -> None:
    completed = subprocess.run(
        [VOLO_CONVERT, "demo"],
        cwd=tmp_path,
        env=user_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert completed.returncode == 0, completed.stdout
    shown = {shape(line) for line in transcript("volo-convert demo")}
    printed = completed.stdout.splitlines()
    assert [line for line in printed if shape(line) not in shown] == []
    assert printed[-1] == "PASS"
    assert sorted(path.name for path in (tmp_path / "volo-demo").iterdir()) == [
        "d1_224.h5",
        "d1_224_84.2.pth.tar",
    ]


def read_terminal(command: list[str], cwd: Path) -> tuple[int, str]:
    """Runs `command` with a pseudo-terminal as stdout and stderr; its exit code and output."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, TERMINAL_SIZE)
    process = subprocess.Popen(
        command, cwd=cwd, env=user_environment(), stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return process.wait(), b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_shows_one_live_status_line(d1_checkpoint: Path, tmp_path: Path) -> None:
    exit_code, output = read_terminal(
        [VOLO_CONVERT, d1_checkpoint, "-o", "d1.h5", "--device", "cpu"], tmp_path
    )
    assert exit_code == 0, output
    redraws = [match.groups() for match in LIVE_LINE.finditer(output)]
    verifying = {seconds for stage, seconds, _ in redraws if stage == "verifying"}
    assert len(verifying) >= 2, output  # its clock moved while the stage ran
    assert {stage for stage, _, _ in redraws} >= {"loading", "verifying"}
    # What stays on the screen: the finished stages and the summary, the live line cleared.
    screen = [line.rsplit("\r", 1)[-1] for line in output.replace("\r\n", "\n").split("\n")]
    screen = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).strip() for line in screen]
    screen = [line for line in screen if line]
    # A .h5 file is written straight from the checkpoint: porting happens while saving.
    assert [line.split()[0] for line in screen[:6]] == [
        "loading",
        "building",
        "saving",
        "reloading",
        "verifying",
        "recording",
    ]
    assert screen[-1] == "PASS"
    assert not LIVE_LINE.search("\n".join(screen))
