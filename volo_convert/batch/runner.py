"""Batch conversion: many checkpoints, each in its own process, with a resumable report.

Each checkpoint is converted and verified in a fresh spawned process. That costs the
imports once per file (about 10 s, small beside a d5 conversion) and buys three things:
a crash or an out-of-memory kill on one file cannot take the batch down, the memory of
one conversion is returned before the next starts, and the process's peak RSS is that
file's true peak. The driver never imports torch; only the workers do.

After every file, `report.json` and `report.md` are rewritten in the output folder, so an
interrupted batch resumes where it stopped: an output is skipped when the report says it
passed, with the same settings, from a checkpoint with the same SHA-256, and the output
still holds the very bytes that were written (size and SHA-256 of each file). The driver
hashes a checkpoint only to compare it with such a row; on a fresh run the conversion's own
hash fills the report. A stop signal reaches the worker too (it dies with its driver even
when the driver is killed outright), removes what the worker staged, and the report says
what was done so far.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from volo_convert.batch.report import (
    REPORT_JSON,
    REPORT_MD,
    BatchEntry,
    BatchReport,
    write_batch_report,
)
from volo_convert.batch.worker import convert_isolated
from volo_convert.errors import ConversionError, first_line, one_line
from volo_convert.options import (
    DEFAULT_BATCH_OPTIONS,
    DEFAULT_COMPUTE_DTYPE,
    DEFAULT_HEAD,
    DEFAULT_INPUT,
    DEFAULT_TFLITE_BATCH,
    SAVEDMODEL,
    TFLITE_DTYPES,
    BatchOptions,
    ConvertOptions,
    Status,
    default_atol,
    default_min_top1,
    file_precision,
)
from volo_convert.paths import (
    check_not_a_stream,
    check_output_path,
    file_sha256,
    fingerprint,
)
from volo_convert.signals import Stopped
from volo_convert.weights.hub_folder import CONFIG_NAME, checkpoint_source, is_hub_folder

CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".safetensors")

BatchStageCallback = Callable[[Path, str], None]


def find_checkpoints(paths: Iterable[str | Path]) -> list[Path]:
    """The checkpoints named by `paths`; a folder stands for its checkpoint files and the
    hub folders (a folder holding config.json) in it, and a hub folder for itself.

    Raises a ConversionError for a path that does not exist, for a folder without
    checkpoints, and for two checkpoints that would write the same output name. Each
    file is checked by the input policy when its turn comes, so one bad file (a FIFO,
    say) is reported and the others go on.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        check_not_a_stream(path, "input")
        if is_hub_folder(path):
            found.append(path)
        elif path.is_dir():
            inside = sorted(
                child
                for child in path.iterdir()
                if child.name.endswith(CHECKPOINT_SUFFIXES) or is_hub_folder(child)
            )
            if not inside:
                raise ConversionError(
                    f"{path}: no checkpoints in this folder (expected "
                    f"{', '.join('*' + suffix for suffix in CHECKPOINT_SUFFIXES)}, or hub "
                    f"folders holding {CONFIG_NAME})"
                )
            found += inside
        elif path.exists() or path.is_symlink():
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
    """The name without its checkpoint suffix: `d1_224_84.2.pth.tar` -> `d1_224_84.2`;
    a hub folder's own name."""
    for suffix in CHECKPOINT_SUFFIXES:
        if checkpoint.name.endswith(suffix):
            return checkpoint.name.removesuffix(suffix)
    return checkpoint.stem


def output_name(checkpoint: Path, options: ConvertOptions) -> str:
    """The name of `checkpoint`'s output, unique per format and what sets the model apart,
    so several outputs of one checkpoint can sit in one folder.

    `<stem>[_<tflite dtype>][_b<tflite batch>][_<compute dtype>][_<head>][_<input>]`, then
    `.h5`, `.keras`, `.tflite` or `_savedmodel` (a folder); each tag only where it is not
    the default: `d1_224_84.2_int8.tflite`, `d1_224_84.2_b8.tflite`,
    `d1_224_84.2_bfloat16_savedmodel`. (--tflite-io and --calibration-images are not in
    the name; the report's row records them.)
    """
    fmt = options.output_format
    assert fmt is not None, "a batch always names its format"
    tags = [output_stem(checkpoint)]
    if options.tflite_dtype != TFLITE_DTYPES[0]:
        tags.append(options.tflite_dtype)
    if options.tflite_batch != DEFAULT_TFLITE_BATCH:
        tags.append(f"b{options.tflite_batch}")
    if options.output_compute_dtype != DEFAULT_COMPUTE_DTYPE:
        tags.append(options.output_compute_dtype)
    if options.output_head != DEFAULT_HEAD:
        tags.append(options.output_head)
    if options.output_input != DEFAULT_INPUT:
        tags.append(options.output_input)
    name = "_".join(tags)
    return f"{name}_{SAVEDMODEL}" if fmt == SAVEDMODEL else f"{name}.{fmt}"


def output_path(checkpoint: Path, out_dir: Path, options: ConvertOptions) -> Path:
    """Where the batch writes `checkpoint`'s model: OUT_DIR/`output_name`."""
    return out_dir / output_name(checkpoint, options)


def output_settings(options: ConvertOptions) -> dict[str, str]:
    """What an output was written with, beyond its checkpoint: a re-run skips an output
    only when these match the report's row."""
    return {
        "format": str(options.output_format),
        "tflite_dtype": options.tflite_dtype,
        "tflite_io": options.tflite_io,
        "tflite_batch": str(options.tflite_batch),
        "compute_dtype": options.output_compute_dtype,
        "head": options.output_head,
        "input": options.output_input,
        "calibration_images": "\n".join(options.calibration_images),
        "require_gpu_compatible": str(options.require_gpu_compatible),
    }


def batch_outputs(
    checkpoints: list[Path], out_dir: str | Path, options: ConvertOptions
) -> dict[Path, str]:
    """Every path the batch writes, with what it is: the reports and each model."""
    out_dir = Path(out_dir)
    outputs = {out_dir / name: "the batch report" for name in (REPORT_JSON, REPORT_MD)}
    for checkpoint in checkpoints:
        outputs[output_path(checkpoint, out_dir, options)] = f"the output of {checkpoint.name}"
    return outputs


def load_previous_entries(
    out_dir: Path, on_warning: Callable[[str], None]
) -> dict[str, BatchEntry]:
    """Output name -> entry of the report an earlier run left in `out_dir`.

    A damaged or hand-edited report is no reason to stop: each row that cannot be read
    is reported through `on_warning`, and its file counts as not done.
    """
    path = out_dir / REPORT_JSON
    if not path.exists():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["checkpoints"]
        if not isinstance(rows, list):
            raise TypeError("'checkpoints' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as error:
        on_warning(f"{path} is unreadable ({first_line(error)}); converting every file again")
        return {}
    entries = {}
    for number, row in enumerate(rows, start=1):
        try:
            entry = BatchEntry.from_row(row)
        except ValueError as error:
            on_warning(f"{path}: row {number} is unreadable ({error}); its file counts as not done")
            continue
        entries[entry.output] = entry
    return entries


def _is_done(
    previous: BatchEntry | None, sha256: str, output: Path, options: ConvertOptions
) -> bool:
    """True when an earlier run converted and verified this very content into this output
    with the same settings, within today's bars, and the output still holds the very bytes
    it wrote."""
    if previous is None or not previous.ok or previous.sha256 != sha256:
        return False
    if previous.settings != output_settings(options):
        return False
    precision = file_precision(options.tflite_dtype, options.output_compute_dtype)
    atol = options.atol if options.atol is not None else default_atol(precision)
    if atol is not None and (previous.max_abs_diff is None or previous.max_abs_diff > atol):
        return False
    min_top1 = options.min_top1 if options.min_top1 is not None else default_min_top1(precision)
    if min_top1 is not None and (
        previous.top1_agreement is None or previous.top1_agreement < min_top1
    ):
        return False
    return bool(previous.output_files) and fingerprint(output) == previous.output_files


def _kept_entries(
    previous: dict[str, BatchEntry], written: set[str], out_dir: Path
) -> list[BatchEntry]:
    """The earlier rows of the other outputs in `out_dir` (another format, say) that
    still hold what they wrote: the report goes on describing them."""
    return [
        entry
        for name, entry in previous.items()
        if name not in written
        and entry.ok
        and bool(entry.output_files)
        and fingerprint(out_dir / name) == entry.output_files
    ]


def _prepare_out_dir(out_dir: Path, checkpoints: list[Path]) -> None:
    """Creates the output folder and checks that the reports can be written there."""
    check_not_a_stream(out_dir, "output")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConversionError(
            f"{out_dir}: cannot create the output folder ({error.strerror})"
        ) from None
    for name in (REPORT_JSON, REPORT_MD):
        check_output_path(out_dir / name, overwrite=True, inputs=checkpoints)


def _convert_one(
    checkpoint: Path,
    output: Path,
    previous: BatchEntry | None,
    options: BatchOptions,
    notify: BatchStageCallback,
) -> BatchEntry:
    """The report row of one checkpoint: skipped as done, converted, or why it failed.

    The checkpoint is hashed here only when an earlier run left a row to compare with;
    otherwise the worker's conversion hashes it, as it reads it, for the row.
    """
    entry = BatchEntry(
        file=checkpoint.name,
        output=output.name,
        sha256=None,
        status=Status.ERROR,
        settings=output_settings(options.convert),
    )
    try:
        weights = checkpoint_source(checkpoint).weights
        if previous is not None:
            notify(checkpoint, "hashing")
            entry.sha256 = file_sha256(weights)
    except ConversionError as error:
        return dataclasses.replace(entry, reason=one_line(str(error)))
    except OSError as error:
        return dataclasses.replace(
            entry, reason=f"{checkpoint}: cannot be read ({first_line(error)})"
        )
    if entry.sha256 is not None and _is_done(previous, entry.sha256, output, options.convert):
        return dataclasses.replace(previous, file=checkpoint.name, status=Status.SKIPPED)
    notify(checkpoint, "starting")
    return convert_isolated(
        checkpoint, output, entry, options, lambda stage: notify(checkpoint, stage)
    )


def run_batch(
    checkpoints: list[Path],
    out_dir: str | Path,
    options: BatchOptions = DEFAULT_BATCH_OPTIONS,
    on_stage: BatchStageCallback | None = None,
    on_entry: Callable[[BatchEntry], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> BatchReport:
    """Converts and verifies every checkpoint into `out_dir`.

    A file that fails is recorded with its reason and the batch goes on. The report
    files are rewritten after every checkpoint, one row per output; the rows an earlier
    run left for other outputs still in place are kept (`BatchReport.kept`). A stop
    signal stops the worker, records the file in hand as stopped, writes the report and
    re-raises.

    Args:
        checkpoints: the checkpoint files, as `find_checkpoints` lists them.
        out_dir: where the models and `report.json`/`report.md` go (created).
        options: see `BatchOptions`.
        on_stage: called with (checkpoint, stage) as each stage of each file starts.
        on_entry: called with each finished entry.
        on_warning: called with a line about a damaged earlier report.
    """
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, checkpoints)
    warn = on_warning or (lambda line: None)
    previous_entries = load_previous_entries(out_dir, warn)
    outputs = [output_path(checkpoint, out_dir, options.convert) for checkpoint in checkpoints]
    kept = _kept_entries(previous_entries, {output.name for output in outputs}, out_dir)
    report = BatchReport(entries=[], kept=kept)
    started = time.perf_counter()

    def notify(checkpoint: Path, stage: str) -> None:
        if on_stage is not None:
            on_stage(checkpoint, stage)

    for checkpoint, output in zip(checkpoints, outputs, strict=True):
        previous = None if options.force else previous_entries.get(output.name)
        try:
            entry = _convert_one(checkpoint, output, previous, options, notify)
        except Stopped as stopped:
            reason = f"stopped by {stopped.name} before it finished"
            report.entries.append(
                BatchEntry(
                    checkpoint.name,
                    output.name,
                    None,
                    Status.ERROR,
                    reason=reason,
                    settings=output_settings(options.convert),
                )
            )
            report.wall_seconds = time.perf_counter() - started
            write_batch_report(out_dir, report)
            raise
        report.entries.append(entry)
        report.wall_seconds = time.perf_counter() - started
        write_batch_report(out_dir, report)
        if on_entry is not None:
            on_entry(entry)
    return report
