"""One table type for every printed table and CSV of the package, the tools and the
benchmarks: rows of named columns, printed aligned or as Markdown, written as CSV."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from mmdet_regptq.io import atomic_write_text

__all__ = ['Table']


@dataclass
class Table:
    """Rows of named columns; ``format()`` aligns them, ``to_csv()`` writes them.

    Args:
        columns: column names in print order.
        rows: one dict per row (missing keys print as ``-``, write as empty CSV cells).
        title: printed above the table.
        digits: decimals of printed floats; ``None`` prints them as they are (rows that
            hold already rounded numbers).
    """
    columns: Sequence[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    title: str = ''
    digits: int | None = 4

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, Any]], title: str = '',
                  digits: int | None = None) -> 'Table':
        """A table whose columns are the rows' keys in first-seen order."""
        rows = list(rows)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        return cls(columns, rows, title=title, digits=digits)

    def add(self, **row: Any) -> None:
        unknown = sorted(set(row) - set(self.columns))
        if unknown:
            raise KeyError(f'Table.add: unknown column(s) {unknown}; allowed: {list(self.columns)}')
        self.rows.append(row)

    def column(self, name: str) -> list[Any]:
        return [row.get(name) for row in self.rows]

    def format(self) -> str:
        """Right-aligned columns under the title."""
        cells = self._cells()
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines.append('  '.join(c.rjust(w) for c, w in zip(self.columns, widths)))
        lines += ['  '.join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
        return '\n'.join(lines)

    def to_markdown(self) -> str:
        """A Markdown table (the title as a line above it), ready to paste into docs."""
        lines = [self.title, ''] if self.title else []
        lines.append('| ' + ' | '.join(self.columns) + ' |')
        lines.append('|' + '---|' * len(self.columns))
        lines += ['| ' + ' | '.join(r) + ' |' for r in self._cells()]
        return '\n'.join(lines)

    def to_csv(self, path: str | Path) -> Path:
        """Write the rows as CSV atomically (a reader never sees half a file)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.columns), lineterminator='\n')
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in self.columns})
        return atomic_write_text(buffer.getvalue(), path)

    def _cells(self) -> list[list[str]]:
        return [[_cell(row.get(c), self.digits) for c in self.columns] for row in self.rows]


def _cell(value: Any, digits: int | None) -> str:
    if value is None:
        return '-'
    if isinstance(value, float) and digits is not None:
        if math.isnan(value):
            return 'nan'
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f'{value:.3e}'
        return f'{value:.{digits}f}'
    return str(value)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ''
    if isinstance(value, float):
        return repr(value)
    return value
