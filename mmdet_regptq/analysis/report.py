"""Tables (printed and written as CSV) and PNG figures of the analysis commands.

Figures are drawn on matplotlib's ``Figure`` + Agg canvas directly, so the analysis never
touches pyplot's global state or the user's chosen backend.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ['Table', 'new_figure', 'save_figure']


@dataclass
class Table:
    """Rows of named columns; ``format()`` aligns them, ``to_csv()`` writes them.

    Args:
        columns: column names in print order.
        rows: one dict per row (missing keys print as ``-``).
        title: printed above the table.
    """
    columns: Sequence[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    title: str = ''

    def add(self, **row: Any) -> None:
        unknown = sorted(set(row) - set(self.columns))
        if unknown:
            raise KeyError(f'Table.add: unknown column(s) {unknown}; allowed: {list(self.columns)}')
        self.rows.append(row)

    def column(self, name: str) -> list[Any]:
        return [row.get(name) for row in self.rows]

    def format(self) -> str:
        cells = [[_cell(row.get(c)) for c in self.columns] for row in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines.append('  '.join(c.rjust(w) for c, w in zip(self.columns, widths)))
        lines += ['  '.join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
        return '\n'.join(lines)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(self.columns))
            writer.writeheader()
            for row in self.rows:
                writer.writerow({c: _csv_value(row.get(c)) for c in self.columns})
        return path


def _cell(value: Any) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        if math.isnan(value):
            return 'nan'
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f'{value:.3e}'
        return f'{value:.4f}'
    return str(value)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ''
    if isinstance(value, float):
        return repr(value)
    return value


def new_figure(ncols: int = 1, nrows: int = 1, *, size: tuple[float, float] = (5.0, 3.8),
               **subplot_kw: Any) -> tuple[Figure, Any]:
    """A figure of ``nrows x ncols`` panels, each about ``size`` inches (Agg canvas)."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Tight layout, write a PNG, return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format='png', bbox_inches='tight')  # keeps multi-line titles whole
    return path
