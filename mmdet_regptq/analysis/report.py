"""PNG figures of the analysis commands (and their :class:`~mmdet_regptq.table.Table`).

Figures are drawn on matplotlib's ``Figure`` + Agg canvas directly, so the analysis never
touches pyplot's global state or the user's chosen backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmdet_regptq.table import Table

__all__ = ['Table', 'new_figure', 'save_figure']


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
