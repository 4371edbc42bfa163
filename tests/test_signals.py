"""Stopping by signal: whatever asks the process to stop, nothing partial is left.

Each run is a real `volo-convert` process stopped at a stage the test picks (paused_cli.py
pauses the pipeline there: the process writes its pid and waits), not after a guessed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import snapshot

pytestmark = pytest.mark.large  # each test stops a real process

ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 180  # imports and loading on a busy 2-core machine
STOP_SECONDS = 60


def start_paused(args: list[object], stage: str, marker: Path) -> subprocess.Popen:
    """Starts `volo-convert ARGS`, pausing at `stage`; returns once the pause is reached."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PAUSE_AT": f"{stage}:{marker}"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "paused_cli.py"), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which a test may signal whole
    )
    deadline = time.monotonic() + START_SECONDS
    while not marker.exists() or not marker.read_text():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"never reached {stage}"
        time.sleep(0.2)
    return process


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"process {pid} is still running")


@pytest.mark.parametrize(
    ("stage", "stop_signal", "exit_code"),
    [
        ("saving", signal.SIGTERM, 143),
        ("verifying", signal.SIGHUP, 129),
        ("verifying", signal.SIGINT, 130),
    ],
)
def test_stop_signal_leaves_nothing_and_exits_128_plus_n(
    d1_checkpoint: Path, tmp_path: Path, stage: str, stop_signal: int, exit_code: int
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.h5").write_bytes(b"user data")
    before = snapshot(out_dir)
    marker = tmp_path / "paused"
    process = start_paused(
        [d1_checkpoint, "-o", out_dir / "d1.h5", "--report", out_dir / "r.json"], stage, marker
    )
    assert any(path.name.endswith(".partial.h5") for path in out_dir.iterdir())  # staged
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=STOP_SECONDS)
    assert process.returncode == exit_code
    name = signal.Signals(stop_signal).name
    assert stderr.splitlines()[-1] == f"Aborted: stopped by {name}; nothing partial was left"
    assert "Traceback" not in stderr
    assert snapshot(out_dir) == before


def batch_folder(d1_checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.pth.tar", "b.pth.tar"):
        (folder / name).symlink_to(d1_checkpoint)
    return folder


@pytest.mark.parametrize("to_group", [False, True], ids=["driver", "process-group"])
def test_stopped_batch_stops_its_worker_and_reports_what_was_done(
    d1_checkpoint: Path, tmp_path: Path, to_group: bool
) -> None:
    """SIGTERM to the driver, or to its whole process group as a service manager or a
    terminal's Ctrl-C sends it: the driver exits only once its worker has cleaned up."""
    out_dir = tmp_path / "out"
    marker = tmp_path / "paused"
    driver = start_paused(
        ["batch", batch_folder(d1_checkpoint, tmp_path), "-o", out_dir, "--device", "cpu"],
        "verifying",
        marker,
    )
    worker = int(marker.read_text())
    assert worker != driver.pid
    if to_group:
        os.killpg(driver.pid, signal.SIGTERM)
    else:
        driver.send_signal(signal.SIGTERM)
    driver.wait(timeout=STOP_SECONDS)  # not communicate(): the worker holds the pipes too
    assert not alive(worker)  # the driver waited for its worker's cleanup before it exited
    _, stderr = driver.communicate(timeout=STOP_SECONDS)
    assert driver.returncode == 143
    assert stderr.splitlines()[-1] == "Aborted: stopped by SIGTERM; nothing partial was left"
    assert sorted(path.name for path in out_dir.iterdir()) == ["report.json", "report.md"]
    rows = json.loads((out_dir / "report.json").read_text())["checkpoints"]
    assert [(row["file"], row["status"], row["reason"]) for row in rows] == [
        ("a.pth.tar", "error", "stopped by SIGTERM before it finished")
    ]


def test_killed_driver_takes_its_worker_down(d1_checkpoint: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    marker = tmp_path / "paused"
    driver = start_paused(
        ["batch", batch_folder(d1_checkpoint, tmp_path), "-o", out_dir, "--device", "cpu"],
        "verifying",
        marker,
    )
    worker = int(marker.read_text())
    driver.kill()
    driver.communicate(timeout=STOP_SECONDS)
    wait_gone(worker)  # it got SIGTERM from the kernel and removed what it staged
    assert list(out_dir.iterdir()) == []
