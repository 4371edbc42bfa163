"""TensorFlow's start-up lines are held back; every other line of file descriptor 2 still shows.

Each test runs a fresh interpreter: the lines are written while TensorFlow is imported,
which happens once per process.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import user_environment

from volo_convert.native_logs import DEBUG_ENVIRONMENT, STARTUP_LINES

pytestmark = pytest.mark.large  # each test runs a fresh interpreter

STARTUP_PATTERNS = [re.compile(pattern) for pattern in STARTUP_LINES]
CLI = [sys.executable, "-m", "volo_convert"]

# Imports the package and Keras, then shows what was held back, as `--debug` does, after a
# marker line.
SHOW_HELD_BACK = """
import sys
import volo_convert
import keras
from volo_convert.native_logs import show_everything
print("held back:", file=sys.stderr, flush=True)
show_everything()
"""

# A known line, a real TensorFlow error and a plain line, all written inside the window.
TENSORFLOW_ERROR = """
import os
import volo_convert
import tensorflow as tf
from volo_convert.native_logs import STARTUP_LINES, known_lines_held_back
with known_lines_held_back(STARTUP_LINES):
    os.write(2, b"I0000 00:00:1.5 7 port.cc:153] oneDNN custom operations are on. (test)\\n")
    try:
        tf.io.read_file("/no/such/file/anywhere")
    except tf.errors.NotFoundError:
        pass
    os.write(2, b"written after the error\\n")
"""

# A native library's last words before it aborts the process, inside the window.
ABORT = """
import os
from volo_convert.native_logs import STARTUP_LINES, known_lines_held_back
with known_lines_held_back(STARTUP_LINES):
    os.write(2, b"F0000 fatal.cc:1] Check failed: the last words\\n")
    os.abort()
"""


def python(code: str, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=user_environment(**environment),
    )


def startup_lines_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(p.search(line) for p in STARTUP_PATTERNS)]


def test_import_is_quiet_and_keeps_what_it_held_back() -> None:
    completed = python(SHOW_HELD_BACK)
    assert completed.returncode == 0, completed.stderr
    marker, *held = completed.stderr.splitlines()
    assert marker == "held back:"  # the import itself wrote nothing
    assert len(held) > 0
    assert startup_lines_in("\n".join(held)) == held


def test_a_real_tensorflow_error_still_reaches_the_user() -> None:
    completed = python(TENSORFLOW_ERROR)
    assert completed.returncode == 0, completed.stderr
    assert startup_lines_in(completed.stderr) == []
    lines = completed.stderr.splitlines()
    failed = [index for index, line in enumerate(lines) if "OP_REQUIRES failed at" in line]
    assert failed, completed.stderr
    assert "/no/such/file/anywhere; No such file or directory" in lines[failed[0]]
    assert lines.index("written after the error") > failed[0]


def test_lines_written_just_before_an_abort_still_reach_the_user() -> None:
    completed = python(ABORT)
    assert completed.returncode == -signal.SIGABRT
    assert "F0000 fatal.cc:1] Check failed: the last words" in completed.stderr.splitlines()


def test_debug_shows_the_startup_lines_before_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.h5"
    verify = [*CLI, "verify", missing, tmp_path / "missing.pth.tar"]  # a command with Keras
    quiet = subprocess.run(verify, capture_output=True, text=True, env=user_environment())
    assert quiet.returncode == 2
    assert quiet.stderr == f"Error: {missing}: no such file\n"

    debug = subprocess.run(
        [*verify, "--debug"],
        capture_output=True,
        text=True,
        env=user_environment(),
    )
    startup = startup_lines_in(debug.stderr)
    assert startup, debug.stderr
    assert debug.stderr.index(startup[-1]) < debug.stderr.index("Traceback")
    assert debug.stderr.rstrip().endswith(f"ConversionError: {missing}: no such file")


def test_the_environment_variable_shows_them_as_they_come() -> None:
    completed = python(SHOW_HELD_BACK, **{DEBUG_ENVIRONMENT: "1"})
    assert completed.returncode == 0, completed.stderr
    shown, held = completed.stderr.split("held back:\n")
    assert startup_lines_in(shown)
    assert held == ""  # none was held back
