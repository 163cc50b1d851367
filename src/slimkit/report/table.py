"""Console tables (rich) for technique summaries and run results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from slimkit.core.technique import TechniqueSummary


def cell_text(value: Any) -> str:
    """A table cell: floats to 4 significant digits, NaN as ``-``."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}"
    return str(value)


def make_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("module", "type", "metric") else "right"
        )
    for row in rows:
        table.add_row(*(cell_text(v) for v in row))
    return table


def summary_table(summary: TechniqueSummary) -> Table:
    """Per-layer table of one technique, with skipped modules listed under it."""
    table = make_table(f"{summary.technique}: per layer", summary.columns, summary.rows)
    if summary.totals:
        table.caption = "totals: " + ", ".join(
            f"{k}={cell_text(v)}" for k, v in summary.totals.items()
        )
    return table


def print_summary(summary: TechniqueSummary, console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(summary))
    for name, reason in summary.skipped:
        console.print(f"  skipped {name}: {reason}")
