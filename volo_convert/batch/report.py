"""The batch report: its rows, and one table as text for the terminal, Markdown and JSON."""

from __future__ import annotations

import dataclasses
import json
import resource
import typing
from pathlib import Path
from typing import Any

from volo_convert.environment import environment
from volo_convert.errors import one_line
from volo_convert.options import Status
from volo_convert.paths import write_text
from volo_convert.text_table import render_table

REPORT_JSON = "report.json"
REPORT_MD = "report.md"

COLUMNS = (
    "file",
    "output",
    "variant",
    "size",
    "parameters",
    "max abs diff",
    "max rel diff",
    "top-1",
    "convert s",
    "verify s",
    "peak MB",
    "status",
    "reason",
)
MEGABYTE = 1024 * 1024
TERMINAL_REASON_CHARS = 160  # report.md and report.json keep the whole reason
_REQUIRED_FIELDS = ("file", "output", "sha256", "status")


@dataclasses.dataclass
class BatchEntry:
    """One row of the batch report."""

    file: str
    output: str
    sha256: str | None
    status: str
    variant: str | None = None
    image_size: int | None = None
    parameters: int | None = None
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    top1_agreement: float | None = None
    convert_seconds: float | None = None
    verify_seconds: float | None = None
    peak_rss_bytes: int | None = None
    reason: str | None = None
    output_files: dict[str, str] | None = None  # what was written: name -> "size:sha256"
    stage: str | None = None  # the last stage this file reached; where a failure happened
    settings: dict[str, str] | None = None  # what the output was written with (runner.py)

    @property
    def ok(self) -> bool:
        """True for a file converted and verified, now or by an earlier run."""
        return self.status in (Status.PASSED, Status.SKIPPED)

    @classmethod
    def from_row(cls, row: Any) -> BatchEntry:
        """An entry from a report.json row; ValueError says what is wrong with a bad one."""
        if not isinstance(row, dict):
            raise ValueError(f"expected an object, found {type(row).__name__}")
        hints = typing.get_type_hints(cls)
        if unknown := sorted(set(row) - set(hints)):
            raise ValueError(f"unknown fields {', '.join(map(str, unknown))}")
        for name, hint in hints.items():
            if name not in row and name in _REQUIRED_FIELDS:
                raise ValueError(f"field {name!r} is missing")
            value = row.get(name)
            allowed = tuple(typing.get_origin(kind) or kind for kind in typing.get_args(hint))
            allowed = allowed or (hint,)
            if float in allowed:
                allowed = (*allowed, int)
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise ValueError(f"field {name!r} holds {value!r}")
        if row["status"] not in set(Status):
            raise ValueError(f"unknown status {row['status']!r}")
        for name in ("output_files", "settings"):
            if row.get(name) and not all(isinstance(value, str) for value in row[name].values()):
                raise ValueError(f"field {name!r} holds a value that is not text")
        return cls(**row)


@dataclasses.dataclass
class BatchReport:
    """The whole batch: one entry per output of this run, and the totals; `kept` are the
    rows an earlier run left for other outputs still in the folder, which report.json and
    report.md go on listing after this run's rows (the totals and the exit code are this
    run's)."""

    entries: list[BatchEntry]
    wall_seconds: float = 0.0
    kept: list[BatchEntry] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(entry.ok for entry in self.entries)

    def summary(self) -> dict[str, Any]:
        """Counts, wall time, the worst parity figure and the largest per-file peak RSS."""
        diffs = [entry.max_abs_diff for entry in self.entries if entry.max_abs_diff is not None]
        peaks = [entry.peak_rss_bytes for entry in self.entries if entry.peak_rss_bytes]
        return {
            "checkpoints": len(self.entries),
            "converted": sum(entry.status == Status.PASSED for entry in self.entries),
            "skipped": sum(entry.status == Status.SKIPPED for entry in self.entries),
            "failed": sum(not entry.ok for entry in self.entries),
            "wall_seconds": round(self.wall_seconds, 1),
            "worst_max_abs_diff": max(diffs, default=None),
            "largest_peak_rss_bytes": max(peaks, default=None),
            "driver_peak_rss_bytes": own_peak_rss_bytes(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "checkpoints": [dataclasses.asdict(entry) for entry in self.entries + self.kept],
        }


def own_peak_rss_bytes() -> int:
    """This process's peak resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def entry_cells(entry: BatchEntry) -> list[str]:
    """The report row of one entry, one string per column of COLUMNS, each one line."""
    return [
        one_line(entry.file),
        one_line(entry.output),
        entry.variant or "-",
        "-" if entry.image_size is None else str(entry.image_size),
        _figure(entry.parameters, ","),
        _figure(entry.max_abs_diff, ".3g"),
        _figure(entry.max_rel_diff, ".3g"),
        _figure(entry.top1_agreement, ".0%"),
        _figure(entry.convert_seconds, ".1f"),
        _figure(entry.verify_seconds, ".1f"),
        _figure(None if entry.peak_rss_bytes is None else entry.peak_rss_bytes / MEGABYTE, ",.0f"),
        entry.status,
        one_line(entry.reason or ""),
    ]


def summary_line(report: BatchReport) -> str:
    """One line: counts, wall time, worst difference, largest per-file peak RSS."""
    summary = report.summary()
    worst = summary["worst_max_abs_diff"]
    peak = summary["largest_peak_rss_bytes"]
    return (
        f"{summary['checkpoints']} checkpoints: {summary['converted']} converted, "
        f"{summary['skipped']} skipped (already done), {summary['failed']} failed; "
        f"{summary['wall_seconds']:.0f}s; worst max abs diff {_figure(worst, '.3g')}; "
        f"largest peak RSS {_figure(None if peak is None else peak / MEGABYTE, ',.0f')} MB"
    )


def render_markdown(report: BatchReport) -> str:
    """The report as a Markdown document: the summary line, then the table."""
    lines = [
        "# Batch conversion report",
        "",
        summary_line(report),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for entry in report.entries + report.kept:
        cells = [cell.replace("|", "\\|") for cell in entry_cells(entry)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_text(report: BatchReport) -> str:
    """The report as an aligned plain-text table; long reasons are cut short."""
    rows = [list(COLUMNS), *(entry_cells(entry) for entry in report.entries)]
    for row in rows:
        if len(row[-1]) > TERMINAL_REASON_CHARS:
            row[-1] = row[-1][: TERMINAL_REASON_CHARS - 3] + "..."
    return "\n".join([*render_table(rows), summary_line(report)]) + "\n"


def write_batch_report(out_dir: Path, report: BatchReport) -> None:
    """Writes `report.json` and `report.md` into `out_dir`, each atomically."""
    document: dict[str, Any] = {**report.to_dict(), "environment": environment()}
    write_text(out_dir / REPORT_JSON, json.dumps(document, indent=2) + "\n")
    write_text(out_dir / REPORT_MD, render_markdown(report))
