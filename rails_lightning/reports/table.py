"""The one table formatter of every report: markdown tables whose columns are padded to a common width,
so that the same text reads as a table in a terminal and renders as one in a markdown viewer.

The comparison, the leaderboard, the reproduction table and the final lines ``fit`` prints all go
through ``markdown_table`` and ``format_cell``; mean ± std cells through ``mean_pm_std``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence


def format_cell(value: Any) -> str:
    """A table cell: floats to 4 decimals (1 from 100 on, ``nan`` for missing), a whole ``{class_path,
    init_args}`` parameter as its class name, anything else as ``str``."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, dict):
        return str(value.get("class_path", value)).rsplit(".", 1)[-1]
    return str(value)


def format_duration(seconds: float) -> str:
    """A wall time for a table or a line of text: ``95 s``, ``12.5 min``, ``2.4 h``."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def short_number(value: Any) -> Any:
    """A swept or differing setting as a label: floats to 3 significant digits (``0.001``, ``3e-05``)."""
    return f"{value:.3g}" if isinstance(value, float) else value


def mean_pm_std(values: Sequence[float]) -> str:
    """``mean ± std`` (sample std over runs), ``mean ±—`` for a single run (no spread measured), ``—`` for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f} ±—"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table, each column padded to its widest cell; cells through ``format_cell``."""
    cells = [list(header), *([format_cell(value) for value in row] for row in rows)]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)
