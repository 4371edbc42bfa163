"""The batch report: one table as text for the terminal, as Markdown and as JSON."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volo_convert import __version__
from volo_convert.report import write_text

if TYPE_CHECKING:
    from volo_convert.batch import BatchEntry, BatchReport

REPORT_JSON = "report.json"
REPORT_MD = "report.md"

COLUMNS = (
    "file",
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


def batch_environment() -> dict[str, str]:
    """Versions behind a report, read from package metadata so the driver imports no torch."""
    versions = {"volo_convert": __version__, "python": platform.python_version()}
    for package in ("torch", "tensorflow", "keras"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["keras_backend"] = os.environ.get("KERAS_BACKEND", "tensorflow")
    versions["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    return versions


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def entry_cells(entry: BatchEntry) -> list[str]:
    """The report row of one entry, one string per column of COLUMNS."""
    return [
        entry.file,
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
        entry.reason or "",
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
    for entry in report.entries:
        cells = [cell.replace("|", "\\|") for cell in entry_cells(entry)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_text(report: BatchReport) -> str:
    """The report as an aligned plain-text table; long reasons are cut short."""
    rows = [list(COLUMNS), *(entry_cells(entry) for entry in report.entries)]
    for row in rows:
        if len(row[-1]) > TERMINAL_REASON_CHARS:
            row[-1] = row[-1][: TERMINAL_REASON_CHARS - 3] + "..."
    widths = [max(len(row[index]) for row in rows) for index in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n" + summary_line(report) + "\n"


def write_batch_report(out_dir: Path, report: BatchReport) -> None:
    """Writes `report.json` and `report.md` into `out_dir`, each atomically."""
    document: dict[str, Any] = {**report.to_dict(), "environment": batch_environment()}
    write_text(out_dir / REPORT_JSON, json.dumps(document, indent=2) + "\n")
    write_text(out_dir / REPORT_MD, render_markdown(report))
