"""Plain-text tables as the CLI prints them: aligned columns, two spaces apart."""

from __future__ import annotations

from collections.abc import Collection, Sequence

COLUMN_GAP = "  "


def render_table(
    rows: Sequence[Sequence[str] | str], right_aligned: Collection[int] = ()
) -> list[str]:
    """Aligns `rows` into lines, one per row.

    Every column but the last is padded to its widest cell, on the left for the columns in
    `right_aligned` and on the right for the others; the last column is free text, left
    as it is. A row given as one string is a line of its own (a heading within the table)
    and takes no part in the widths. Trailing spaces are dropped.
    """
    cells = [row for row in rows if not isinstance(row, str)]
    widths = [max(len(row[column]) for row in cells) for column in range(len(cells[0]) - 1)]
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        padded = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append(COLUMN_GAP.join([*padded, row[-1]]).rstrip())
    return lines
