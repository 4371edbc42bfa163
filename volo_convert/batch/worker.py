"""One conversion in a spawned worker process, which dies with its driver.

The worker converts and verifies one checkpoint through the pipeline and sends its
stages, then its outcome, through a pipe. A stop signal unwinds the conversion (the staged
output is removed) and the worker exits quietly; the kernel sends it SIGTERM if the
driver dies, even when the driver is killed outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from volo_convert.batch.report import BatchEntry, own_peak_rss_bytes
from volo_convert.errors import ConversionError, first_line, one_line
from volo_convert.options import BatchOptions, Status
from volo_convert.paths import fingerprint
from volo_convert.signals import Stopped, stop_on_signals

PR_SET_PDEATHSIG = 1  # Linux prctl: a signal the kernel sends when the parent dies
WORKER_STOP_SECONDS = 30  # how long a stopped worker may take to clean up
EXITING_STAGE = "exiting"  # the worker has sent its outcome and shuts its libraries down


def _die_with_driver(driver_pid: int) -> None:
    """Asks the kernel to send this worker SIGTERM when its driver dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != driver_pid:  # the driver died before the request took effect
        raise SystemExit(1)


def _convert_in_worker(
    checkpoint: Path,
    output: Path,
    options: BatchOptions,
    connection: Connection,
    driver_pid: int,
) -> None:
    """Runs in the spawned process: converts one file, sends stages then the outcome.

    A stop signal unwinds the conversion (its staged output is removed) and the worker
    exits without a word; so does a worker whose driver is gone. Once the outcome is sent
    the worker ends without Python's teardown (`_exit_now`).
    """
    _die_with_driver(driver_pid)
    try:
        with stop_on_signals():
            from volo_convert.pipeline import convert

            result = convert(
                checkpoint,
                output,
                options.convert,
                on_stage=lambda stage: connection.send(("stage", stage)),
            )
            outcome = ("result", result.to_dict(), fingerprint(output), own_peak_rss_bytes())
    except Stopped:
        return
    except Exception as error:
        reason = one_line(first_line(error))
        if not isinstance(error, ConversionError):
            reason = f"internal error: {type(error).__name__}: {reason}"
        outcome = ("error", reason, None, own_peak_rss_bytes())
    try:
        connection.send(outcome)
        connection.close()
    except OSError:  # the driver is gone: nobody to tell
        pass
    _exit_now()


def _exit_now() -> None:
    """Ends the worker at once, its outcome sent and its output in place.

    Python's and TensorFlow's teardown takes 2.5-3 s per file and would only free memory
    the kernel takes back anyway; the output moved into place or its staged file was
    removed before the outcome was sent, and the driver writes the report.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _entry_from_result(
    entry: BatchEntry, result: dict[str, Any], output_files: dict[str, str], peak_rss: int
) -> BatchEntry:
    parity = result["parity"]
    passed = result["status"] == Status.PASSED
    return dataclasses.replace(
        entry,
        status=Status.PASSED if passed else Status.FAILED,
        variant=result["variant"],
        image_size=result["image_size"],
        sha256=result["checkpoint_sha256"],
        parameters=result["parameters"],
        max_abs_diff=parity["max_abs_diff"],
        max_rel_diff=parity["max_rel_diff"],
        top1_agreement=parity["top1_agreement"],
        convert_seconds=result["convert_seconds"],
        verify_seconds=result["verify_seconds"],
        peak_rss_bytes=peak_rss,
        reason=result["reason"],
        output_files=output_files if passed else None,
    )


def _stop_worker(process: multiprocessing.process.BaseProcess) -> None:
    """Asks a worker to stop (it removes what it staged), then makes sure it is gone."""
    if process.is_alive():
        process.terminate()
        process.join(WORKER_STOP_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()


def convert_isolated(
    checkpoint: Path,
    output: Path,
    entry: BatchEntry,
    options: BatchOptions,
    on_stage: Callable[[str], None],
) -> BatchEntry:
    """Converts and verifies one checkpoint in a spawned process; returns its filled entry.

    A file that fails keeps the stage it failed in (`entry.stage`).
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_convert_in_worker,
        args=(checkpoint, output, options, sender, os.getpid()),
        daemon=True,
    )
    outcome: tuple[Any, ...] | None = None
    stage = None
    try:
        process.start()
        sender.close()  # the worker holds the only writer now, so its exit ends recv()
        while True:
            try:
                message = receiver.recv()
            except EOFError:
                break
            if message[0] == "stage":
                stage = message[1]
                on_stage(stage)
            else:
                outcome = message
                on_stage(EXITING_STAGE)
        process.join()
    finally:
        _stop_worker(process)
        receiver.close()
    entry = dataclasses.replace(entry, stage=stage)
    if outcome is None:
        return dataclasses.replace(
            entry,
            status=Status.ERROR,
            reason=f"the conversion process died without a result (exit code "
            f"{process.exitcode}; a negative code is the signal, -9 often means out of memory)",
        )
    kind, payload, output_files, peak_rss = outcome
    if kind == "error":
        return dataclasses.replace(
            entry, status=Status.ERROR, reason=payload, peak_rss_bytes=peak_rss
        )
    return _entry_from_result(entry, payload, output_files, peak_rss)
