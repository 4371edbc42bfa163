"""Batch conversion: many checkpoints, each in its own process, with a resumable report.

Each checkpoint is converted and verified in a fresh spawned process. That costs the
imports once per file (about 10 s, small beside a d5 conversion) and buys three things:
a crash or an out-of-memory kill on one file cannot take the batch down, the memory of
one conversion is returned before the next starts, and the process's peak RSS is that
file's true peak. The driver never imports torch; only the workers do.

After every file, `report.json` and `report.md` are rewritten in the output folder, so an
interrupted batch resumes where it stopped: a checkpoint is skipped when its output
exists and the report says it passed from a file with the same SHA-256.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from volo_convert.batch.report import (
    REPORT_JSON,
    BatchEntry,
    BatchReport,
    own_peak_rss_bytes,
    write_batch_report,
)
from volo_convert.errors import ConversionError, first_line
from volo_convert.options import DEFAULT_ATOL, DEFAULT_BATCH_OPTIONS, BatchOptions, Status
from volo_convert.provenance import file_sha256

CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".safetensors")
EXITING_STAGE = "exiting"  # the worker has sent its outcome and shuts its libraries down

BatchStageCallback = Callable[[Path, str], None]


def find_checkpoints(paths: Iterable[str | Path]) -> list[Path]:
    """The checkpoint files named by `paths`; a folder stands for its checkpoint files.

    Raises a ConversionError for a path that does not exist, for a folder without
    checkpoints, and for two checkpoints that would write the same output name.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(
                child
                for child in path.iterdir()
                if child.is_file() and child.name.endswith(CHECKPOINT_SUFFIXES)
            )
            if not inside:
                raise ConversionError(
                    f"{path}: no checkpoints in this folder (expected "
                    f"{', '.join('*' + suffix for suffix in CHECKPOINT_SUFFIXES)})"
                )
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise ConversionError(f"{path}: no such file or folder")
    names = [output_stem(path) for path in found]
    if clashes := sorted({name for name in names if names.count(name) > 1}):
        raise ConversionError(
            f"several checkpoints would be written to the same output: {', '.join(clashes)}"
        )
    return found


def output_stem(checkpoint: Path) -> str:
    """The name without its checkpoint suffix: `d1_224_84.2.pth.tar` -> `d1_224_84.2`."""
    for suffix in CHECKPOINT_SUFFIXES:
        if checkpoint.name.endswith(suffix):
            return checkpoint.name.removesuffix(suffix)
    return checkpoint.stem


def load_previous_entries(out_dir: Path) -> dict[str, BatchEntry]:
    """Output name -> entry of the report an earlier run left in `out_dir` (none if unreadable)."""
    try:
        document = json.loads((out_dir / REPORT_JSON).read_text(encoding="utf-8"))
        return {row["output"]: BatchEntry(**row) for row in document["checkpoints"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _is_done(previous: BatchEntry | None, sha256: str, output: Path, atol: float) -> bool:
    """True when an earlier run already converted and verified this very content."""
    return (
        previous is not None
        and previous.ok
        and previous.sha256 == sha256
        and output.is_file()
        and previous.max_abs_diff is not None
        and previous.max_abs_diff <= atol
    )


def _convert_in_worker(
    checkpoint: Path, output: Path, options: BatchOptions, connection: Connection
) -> None:
    """Runs in the spawned process: converts one file, sends stages then the outcome."""
    try:
        from volo_convert.pipeline import convert

        result = convert(
            checkpoint,
            output,
            options.convert,
            on_stage=lambda stage: connection.send(("stage", stage)),
        )
        connection.send(("result", result.to_dict(), own_peak_rss_bytes()))
    except Exception as error:
        reason = first_line(error)
        if not isinstance(error, ConversionError):
            reason = f"internal error: {type(error).__name__}: {reason}"
        connection.send(("error", reason, own_peak_rss_bytes()))
    finally:
        connection.close()


def _entry_from_result(entry: BatchEntry, result: dict[str, Any], peak_rss: int) -> BatchEntry:
    parity = result["parity"]
    passed = result["status"] == Status.PASSED
    return dataclasses.replace(
        entry,
        status=Status.PASSED if passed else Status.FAILED,
        variant=result["variant"],
        image_size=result["image_size"],
        parameters=result["parameters"],
        max_abs_diff=parity["max_abs_diff"],
        max_rel_diff=parity["max_rel_diff"],
        top1_agreement=parity["top1_agreement"],
        convert_seconds=result["convert_seconds"],
        verify_seconds=result["verify_seconds"],
        peak_rss_bytes=peak_rss,
        reason=result["reason"],
    )


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
        target=_convert_in_worker, args=(checkpoint, output, options, sender), daemon=True
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
        if process.is_alive():
            process.terminate()
            process.join()
        receiver.close()
    entry = dataclasses.replace(entry, stage=stage)
    if outcome is None:
        return dataclasses.replace(
            entry,
            status=Status.ERROR,
            reason=f"the conversion process died without a result (exit code "
            f"{process.exitcode}; a negative code is the signal, -9 often means out of memory)",
        )
    if outcome[0] == "error":
        return dataclasses.replace(
            entry, status=Status.ERROR, reason=outcome[1], peak_rss_bytes=outcome[2]
        )
    return _entry_from_result(entry, outcome[1], outcome[2])


def run_batch(
    checkpoints: list[Path],
    out_dir: str | Path,
    options: BatchOptions = DEFAULT_BATCH_OPTIONS,
    on_stage: BatchStageCallback | None = None,
    on_entry: Callable[[BatchEntry], None] | None = None,
) -> BatchReport:
    """Converts and verifies every checkpoint of `paths` into `out_dir`.

    A file that fails is recorded with its reason and the batch goes on. The report
    files are rewritten after every checkpoint.

    Args:
        checkpoints: the checkpoint files, as `find_checkpoints` lists them.
        out_dir: where the Keras files and `report.json`/`report.md` go (created).
        options: see `BatchOptions`.
        on_stage: called with (checkpoint, stage) as each stage of each file starts.
        on_entry: called with each finished entry.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_entries = {} if options.force else load_previous_entries(out_dir)
    report = BatchReport(entries=[])
    started = time.perf_counter()
    fmt = options.convert.output_format
    atol = DEFAULT_ATOL if options.convert.atol is None else options.convert.atol

    def notify(checkpoint: Path, stage: str) -> None:
        if on_stage is not None:
            on_stage(checkpoint, stage)

    for checkpoint in checkpoints:
        output = out_dir / f"{output_stem(checkpoint)}.{fmt}"
        notify(checkpoint, "hashing")
        entry = BatchEntry(
            file=checkpoint.name, output=output.name, sha256=None, status=Status.ERROR
        )
        try:
            entry.sha256 = file_sha256(checkpoint)
        except OSError as error:
            entry.reason = f"{checkpoint}: cannot be read ({first_line(error)})"
        if entry.sha256 is not None:
            previous = previous_entries.get(output.name)
            if _is_done(previous, entry.sha256, output, atol):
                entry = dataclasses.replace(previous, file=checkpoint.name, status=Status.SKIPPED)
            else:
                notify(checkpoint, "starting")
                entry = convert_isolated(
                    checkpoint, output, entry, options, lambda stage, c=checkpoint: notify(c, stage)
                )
        report.entries.append(entry)
        report.wall_seconds = time.perf_counter() - started
        write_batch_report(out_dir, report)
        if on_entry is not None:
            on_entry(entry)
    return report
