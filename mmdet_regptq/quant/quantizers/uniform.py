"""Uniform affine fake quantizer with an LSQ-learnable step size (registered as 'Uniform')."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...registry import QUANTIZERS
from .base import Quantizer
from .functional import (channel_shape, fake_quant_export, grad_scale, normalize_axis,
                         quantize_int, round_ste, subsample_columns, to_channel_rows)
from .ranges import RANGE_METHODS, QuantGrid, minmax_range, qparams_from_range

__all__ = ['UniformQuantizer']


@QUANTIZERS.register_module(name='Uniform')
class UniformQuantizer(Quantizer):
    """``x -> s * (clamp(round(x / s) + z, qmin, qmax) - z)`` with LSQ gradients.

    Computed as ``s * round_ste(clamp(x / s, qmin - z, qmax - z))`` (same values): the input
    gradient is 1 where ``qmin < x / s + z < qmax`` and 0 outside (straight-through), and
    the scale gradient is LSQ's ``round(x / s) - x / s`` inside and ``qmin - z`` /
    ``qmax - z`` where clipped.

    Grids: symmetric → signed ``[-2^(b-1), 2^(b-1) - 1]`` with ``z = 0``; asymmetric →
    unsigned ``[0, 2^b - 1]`` with an integer zero point; ``reduce_range`` (symmetric only)
    → ``[-2^(b-2), 2^(b-2)]``, e.g. ``-64..64`` at 8 bits: ONNX Runtime's ``reduce_range``
    grid, whose int8 codes x any uint8 input fit the int16 pair sums of x86 AVX2 kernels
    (``2 * 255 * 64 < 2^15``). ``scale`` is an ``nn.Parameter``
    trained with LSQ when ``learnable`` (gradient scaled by ``1 / sqrt(n * qmax)`` where
    ``n`` is the number of elements per scale entry: ``numel`` per tensor, ``numel / C`` per
    channel); ``zero_point`` is a float buffer with integer values (never learned).

    Shapes: per tensor, ``scale`` and ``zero_point`` are 0-d. Per channel they take the
    broadcast shape of the tensor given to :meth:`init_from`, e.g. weight
    ``[C_out, C_in, k, k]`` with ``ch_axis=0`` → ``[C_out, 1, 1, 1]``; activation
    ``[N, C, H, W]`` with ``ch_axis=1`` → ``[1, C, 1, 1]``.

    Args:
        bits: 2..16.
        symmetric: signed grid without zero point.
        reduce_range: halve the symmetric grid's magnitude (``|q| <= 2^(b-2)``); needs
            ``symmetric=True`` and ``bits >= 3``.
        per_channel: one scale per slice along ``ch_axis``.
        ch_axis: channel axis (negative allowed).
        learnable: make ``scale`` trainable (LSQ).
        scale_method: a key of ``RANGE_METHODS``: 'minmax', 'percentile', 'mse', 'lp'.
        p: exponent of the 'lp' search.
        percentile: percentile (0, 100] of the 'percentile' method.
        num_candidates: number of clipping ratios tried by 'lp' / 'mse'.
        min_ratio: smallest clipping ratio tried by 'lp' / 'mse'.
        max_search_elements: larger inputs are deterministically subsampled for the
            'percentile' / 'lp' / 'mse' statistics (min/max always use all of the data).
        name: module name used in messages.
    """

    _lazy_shapes = ('scale', 'zero_point')

    def __init__(self, bits: int, *, symmetric: bool = False, reduce_range: bool = False,
                 per_channel: bool = False, ch_axis: int = 0, learnable: bool = True,
                 scale_method: str = 'minmax', p: float = 2.4, percentile: float = 99.99,
                 num_candidates: int = 100, min_ratio: float = 0.2,
                 max_search_elements: int = 1 << 20, name: str = '') -> None:
        super().__init__(bits, name=name)
        if scale_method not in RANGE_METHODS:
            raise ValueError(f'scale_method={scale_method!r} is unknown; allowed: '
                             f'{sorted(RANGE_METHODS)}')
        if not p > 0:
            raise ValueError(f'p={p} must be > 0')
        if not 0 < percentile <= 100:
            raise ValueError(f'percentile={percentile} is out of range; allowed (0, 100]')
        if not 0 < min_ratio <= 1 or num_candidates < 1:
            raise ValueError(f'min_ratio={min_ratio} must be in (0, 1] and '
                             f'num_candidates={num_candidates} >= 1')
        if not isinstance(reduce_range, bool):
            raise ValueError(f'reduce_range={reduce_range!r} is invalid; allowed True/False')
        if reduce_range and (not symmetric or bits < 3):
            raise ValueError(f'reduce_range=True needs symmetric=True and bits >= 3 '
                             f'(got symmetric={symmetric!r}, bits={bits})')
        self.symmetric = symmetric
        self.reduce_range = reduce_range
        self.per_channel = per_channel
        self.ch_axis = ch_axis
        self.learnable = learnable
        self.scale_method = scale_method
        self.p = p
        self.percentile = percentile
        self.num_candidates = num_candidates
        self.min_ratio = min_ratio
        self.max_search_elements = max_search_elements
        self.scale = nn.Parameter(torch.ones(()), requires_grad=learnable)
        self.register_buffer('zero_point', torch.zeros(()))

    @property
    def quant_range(self) -> tuple[int, int]:
        if self.reduce_range:
            return -(2 ** (self.bits - 2)), 2 ** (self.bits - 2)
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    @property
    def grid(self) -> QuantGrid:
        """The integer grid (``qmin``, ``qmax``, ``symmetric``)."""
        qmin, qmax = self.quant_range
        return QuantGrid(qmin, qmax, self.symmetric)

    def _axis(self, ndim: int) -> int | None:
        return normalize_axis(self.ch_axis, ndim) if self.per_channel else None

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """Set ``scale`` / ``zero_point`` from ``x`` with ``scale_method``.

        Args:
            x: weight ``[C_out, ...]`` or an activation sample; per channel, ``x`` must have
                the dimensionality of the tensors later quantized.
        """
        x = x.detach()
        if x.numel() == 0:
            raise ValueError(f'{self.describe()}: init_from() got an empty tensor')
        axis = self._axis(x.dim())
        rows = to_channel_rows(x, axis)                                   # [C, N]
        lo, hi = minmax_range(rows)
        sample = subsample_columns(rows, self.max_search_elements)
        lo, hi = RANGE_METHODS[self.scale_method](
            sample, lo, hi, self.grid, p=self.p, percentile=self.percentile,
            num_candidates=self.num_candidates, min_ratio=self.min_ratio)
        scale, zero_point = qparams_from_range(lo, hi, self.grid)        # [C]
        shape = channel_shape(rows.shape[0], x.dim(), axis) if axis is not None else []
        dtype = x.dtype if x.is_floating_point() else torch.float32
        self.scale.data = scale.reshape(shape).to(dtype)
        self.zero_point = zero_point.reshape(shape).to(dtype)
        self._mark_initialized()

    def _lsq_factor(self, x: Tensor) -> float:
        per_entry = max(x.numel() // max(self.scale.numel(), 1), 1)
        return 1.0 / math.sqrt(per_entry * max(self.quant_range[1], 1))

    def _fake_quant(self, x: Tensor) -> Tensor:
        qmin, qmax = self.quant_range
        scale = self.scale
        if scale.requires_grad:
            scale = grad_scale(scale, self._lsq_factor(x))
        # == clamp(round(x / s) + z, qmin, qmax) - z; clamping before rounding gives LSQ's
        # gradients (torch.clamp passes no gradient at its bounds)
        z = self.zero_point
        return round_ste(torch.clamp(x * (1.0 / scale), qmin - z, qmax - z)) * scale

    def quant_params(self) -> dict[str, Tensor]:
        """``{'scale': ..., 'zero_point': ...}``, detached, in their broadcast shapes."""
        return {'scale': self.scale.detach(), 'zero_point': self.zero_point.detach()}

    def to_int(self, x: Tensor) -> Tensor:
        """Integer codes of ``x`` (``int32``, same shape, values in ``quant_range``)."""
        self._check_initialized()
        return quantize_int(x, self.scale.detach(), self.zero_point, *self.quant_range)

    def fake_quant_export(self, x: Tensor) -> Tensor:
        """Same values as :meth:`forward`, via ``torch.fake_quantize_per_*_affine`` (ONNX Q/DQ)."""
        if not self.enabled:
            return x
        self._check_initialized()
        axis = self._axis(x.dim())
        return fake_quant_export(x, self.scale, self.zero_point, *self.quant_range, axis)

    def extra_repr(self) -> str:
        granularity = f'per_channel(axis={self.ch_axis})' if self.per_channel else 'per_tensor'
        kind = 'symmetric' if self.symmetric else 'asymmetric'
        if self.reduce_range:
            kind += ' reduce_range'
        return (f'{super().extra_repr()}, {kind}, {granularity}, '
                f'scale_method={self.scale_method!r}, learnable={self.learnable}')
