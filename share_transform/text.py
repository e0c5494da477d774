"""Plain-text tables for the reports ``print(plan)`` and the ``sharetx`` commands show."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def format_columns(rows: Sequence[Sequence[str]], left: Collection[int]) -> list[str]:
    """Lines of ``rows`` in aligned columns two spaces apart: columns in ``left`` left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]
