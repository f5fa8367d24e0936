"""Clipping-range estimation for uniform quantizers ('minmax', 'percentile', 'mse', 'lp').

Every method maps channel rows ``[C, N]`` (``C = 1`` per tensor) to a clipping range
``(lo, hi)``, each ``[C]``, with ``lo <= 0 <= hi`` so that zero is exactly representable.
Methods are looked up by name in :data:`RANGE_METHODS` (extend it with
:func:`register_range_method`), never by ``if/elif``.

The 'lp' / 'mse' search follows BRECQ / QDrop: shrink the min/max range by
``num_candidates`` ratios from 1.0 down to ``min_ratio`` and keep, per channel, the range
that minimises ``mean |x - q(x)|^p`` (``p = 2`` for 'mse').
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor


__all__ = ['QuantGrid', 'RANGE_METHODS', 'register_range_method', 'qparams_from_range',
           'minmax_range']

_EPS = 1e-8
_SEARCH_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class QuantGrid:
    """Integer grid of a quantizer: levels ``qmin..qmax``; symmetric grids have ``z = 0``."""

    qmin: int
    qmax: int
    symmetric: bool


class RangeMethod(Protocol):
    """``(rows [C, N], lo [C], hi [C], grid, **options) -> (lo [C], hi [C])``."""

    def __call__(self, rows: Tensor, lo: Tensor, hi: Tensor, grid: QuantGrid, *, p: float,
                 percentile: float, num_candidates: int, min_ratio: float
                 ) -> tuple[Tensor, Tensor]:
        ...


RANGE_METHODS: dict[str, RangeMethod] = {}


def register_range_method(name: str) -> Callable[[RangeMethod], RangeMethod]:
    """Decorator adding a range method to :data:`RANGE_METHODS` under ``name``."""

    def deco(fn: RangeMethod) -> RangeMethod:
        if name in RANGE_METHODS:
            raise KeyError(f'range method {name!r} is already registered')
        RANGE_METHODS[name] = fn
        return fn

    return deco


def minmax_range(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``(min(x, 0), max(x, 0))`` of ``rows [C, N]`` → two ``[C]`` tensors."""
    return rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0)


def qparams_from_range(lo: Tensor, hi: Tensor, grid: QuantGrid) -> tuple[Tensor, Tensor]:
    """Scale and zero point (both of ``lo``'s shape) covering ``[lo, hi]``.

    Symmetric: ``s = max(|lo|, hi) / qmax`` and ``z = 0`` on a signed grid. Asymmetric:
    ``s = (hi - lo) / (qmax - qmin)`` and ``z = clamp(round(qmin - lo / s), qmin, qmax)``.
    """
    if grid.symmetric:
        scale = (torch.maximum(-lo, hi) / max(grid.qmax, 1)).clamp(min=_EPS)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (grid.qmax - grid.qmin)).clamp(min=_EPS)
    zero_point = torch.clamp(torch.round(grid.qmin - lo / scale), grid.qmin, grid.qmax)
    return scale, zero_point


@register_range_method('minmax')
def _minmax(rows: Tensor, lo: Tensor, hi: Tensor, grid: QuantGrid, **_: object
            ) -> tuple[Tensor, Tensor]:
    return lo, hi


@register_range_method('percentile')
def _percentile(rows: Tensor, lo: Tensor, hi: Tensor, grid: QuantGrid, *, percentile: float,
                **_: object) -> tuple[Tensor, Tensor]:
    q = percentile / 100.0
    rows = rows.float()
    if grid.symmetric:
        bound = torch.quantile(rows.abs(), q, dim=1)
        return -bound, bound
    low = torch.quantile(rows, 1.0 - q, dim=1).clamp(max=0)
    high = torch.quantile(rows, q, dim=1).clamp(min=0)
    return low, high


def _lp_error(x: Tensor, scale: Tensor, zero_point: Tensor, grid: QuantGrid, p: float
              ) -> Tensor:
    """``mean |x - q(x)|^p`` over the last dim: ``x [1, C, N]``, qparams ``[K, C, 1]`` →
    ``[K, C]``. One temporary, updated in place (this is the hot loop of calibration)."""
    t = x * (1.0 / scale)
    t.round_().clamp_(grid.qmin - zero_point, grid.qmax - zero_point)
    t.mul_(scale).sub_(x).abs_()
    t = t.square_() if p == 2 else t.pow_(p)
    return t.mean(dim=-1)


def _lp_search(rows: Tensor, lo: Tensor, hi: Tensor, grid: QuantGrid, *, p: float,
               num_candidates: int, min_ratio: float) -> tuple[Tensor, Tensor]:
    """Grid search of the shrink ratio per row, vectorised over rows and candidate chunks."""
    ratios = torch.linspace(1.0, min_ratio, num_candidates, device=rows.device,
                            dtype=rows.dtype)
    best_err = torch.full_like(lo, float('inf'))
    best_ratio = torch.ones_like(lo)
    chunk = max(1, _SEARCH_CHUNK_ELEMENTS // max(rows.numel(), 1))
    x = rows.unsqueeze(0)                                       # [1, C, N]
    for start in range(0, num_candidates, chunk):
        r = ratios[start:start + chunk].view(-1, 1)             # [K, 1]
        scale, zero_point = qparams_from_range(lo * r, hi * r, grid)  # [K, C]
        err = _lp_error(x, scale.unsqueeze(-1), zero_point.unsqueeze(-1), grid, p)  # [K, C]
        chunk_err, chunk_idx = err.min(dim=0)                   # first minimum wins
        better = chunk_err < best_err
        best_err = torch.where(better, chunk_err, best_err)
        best_ratio = torch.where(better, r.view(-1)[chunk_idx], best_ratio)
    return lo * best_ratio, hi * best_ratio


@register_range_method('lp')
def _lp(rows: Tensor, lo: Tensor, hi: Tensor, grid: QuantGrid, *, p: float,
        num_candidates: int, min_ratio: float, **_: object) -> tuple[Tensor, Tensor]:
    return _lp_search(rows, lo, hi, grid, p=p, num_candidates=num_candidates,
                      min_ratio=min_ratio)


@register_range_method('mse')
def _mse(rows: Tensor, lo: Tensor, hi: Tensor, grid: QuantGrid, *, num_candidates: int,
         min_ratio: float, **_: object) -> tuple[Tensor, Tensor]:
    return _lp_search(rows, lo, hi, grid, p=2.0, num_candidates=num_candidates,
                      min_ratio=min_ratio)
