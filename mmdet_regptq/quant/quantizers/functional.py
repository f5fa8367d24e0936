"""Stateless fake-quantization helpers shared by the quantizers.

Conventions: an affine grid has integer levels ``qmin..qmax`` and a zero point ``z`` (an
integer stored as float); ``x -> s * (clamp(round(x / s) + z, qmin, qmax) - z)``. The
division is written ``x * (1 / s)`` everywhere so that the values match
``torch.fake_quantize_per_*_affine`` bit for bit (those kernels multiply by the inverse).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    'round_ste', 'grad_scale', 'normalize_axis', 'channel_shape', 'to_channel_rows',
    'subsample_columns', 'fake_quant', 'quantize_int', 'fake_quant_export',
]


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (half to even) with a straight-through gradient of 1.

    Same gradient as ``(x.round() - x).detach() + x`` but the value is *exactly* the
    rounded integer (``x - x.detach()`` is exactly 0): the textbook form can be one ulp
    off, which moves boundary codes just outside ``clamp``'s range (zero gradient there)
    and breaks bitwise equality with ``torch.fake_quantize_*``.
    """
    return x.round().detach() + (x - x.detach())


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Return ``x`` (exactly) with its gradient multiplied by ``factor`` (LSQ)."""
    y = x * factor
    return x.detach() + (y - y.detach())


def normalize_axis(ch_axis: int, ndim: int) -> int:
    """Turn a possibly negative channel axis into ``0..ndim-1`` (ValueError if invalid)."""
    axis = ch_axis + ndim if ch_axis < 0 else ch_axis
    if not 0 <= axis < max(ndim, 1):
        raise ValueError(f'ch_axis={ch_axis} is out of range for a {ndim}-d tensor')
    return axis


def channel_shape(num_channels: int, ndim: int, axis: int) -> list[int]:
    """Broadcast shape of a per-channel parameter, e.g. ``(C, 4, 0) -> [C, 1, 1, 1]``."""
    shape = [1] * ndim
    shape[axis] = num_channels
    return shape


def to_channel_rows(x: Tensor, axis: int | None) -> Tensor:
    """Reshape to rows of one channel each.

    Args:
        x: any tensor.
        axis: channel axis (non-negative) or ``None`` for per-tensor.

    Returns:
        ``[C, N]`` with ``C = x.shape[axis]`` (``[1, numel]`` when ``axis`` is None).
    """
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def subsample_columns(rows: Tensor, max_elements: int, seed: int = 0) -> Tensor:
    """Deterministically keep at most ``max_elements`` elements of ``rows`` ``[C, N]``.

    Columns are drawn with replacement from a generator seeded with ``seed`` (cheap for
    very large ``N``); every row keeps the same columns.
    """
    num_rows, num_cols = rows.shape
    if rows.numel() <= max_elements:
        return rows
    keep = max(1, max_elements // max(num_rows, 1))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(num_cols, (keep,), generator=gen).to(rows.device)
    return rows.index_select(1, idx)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Non-differentiable affine fake quantization (used by scale searches)."""
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_int(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes ``clamp(round(x / s) + z, qmin, qmax)`` as an ``int32`` tensor."""
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)
    return q.to(torch.int32)


def fake_quant_export(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                      axis: int | None) -> Tensor:
    """Fake quantization with the ATen ops that export to ONNX QuantizeLinear/DequantizeLinear.

    Args:
        x: tensor to quantize.
        scale: per-tensor (one element) or per-channel (broadcast shape, ``C`` elements).
        zero_point: same shape as ``scale``, integer valued.
        qmin: lowest integer level.
        qmax: highest integer level.
        axis: channel axis of ``x`` for per-channel parameters, ``None`` for per-tensor.

    Returns:
        Tensor of ``x``'s shape, equal to :func:`fake_quant`.
    """
    zp = zero_point.detach().round().to(torch.int32)
    s = scale.detach().to(torch.float32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, s.reshape(()), zp.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, s.reshape(-1), zp.reshape(-1), axis, qmin,
                                                  qmax)
