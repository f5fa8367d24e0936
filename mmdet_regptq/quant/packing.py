"""Pack 2..8-bit integer codes into int32 words (``32 // bits`` values per word, as HAWQ).

Value ``i`` of a word occupies bits ``[i * bits, (i + 1) * bits)`` (little end first); signed
values are stored in two's complement within their ``bits``. Words are returned as
``int32`` (a set top bit reads as a negative int32).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ['values_per_word', 'packed_numel', 'pack_int', 'unpack_int']

_MIN_BITS, _MAX_BITS = 2, 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not _MIN_BITS <= bits <= _MAX_BITS:
        raise ValueError(f'bits={bits!r} is out of range; allowed {_MIN_BITS}..{_MAX_BITS}')


def values_per_word(bits: int) -> int:
    """How many ``bits``-bit values one int32 word holds (e.g. 8 for 4 bits, 10 for 3)."""
    _check_bits(bits)
    return 32 // bits


def packed_numel(numel: int, bits: int) -> int:
    """Number of int32 words needed for ``numel`` values."""
    return math.ceil(numel / values_per_word(bits))


def _value_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def pack_int(values: Tensor, bits: int, *, signed: bool) -> Tensor:
    """Pack integer codes.

    Args:
        values: integer tensor of any shape (flattened in row-major order).
        bits: 2..8.
        signed: values are in ``[-2^(bits-1), 2^(bits-1) - 1]`` (else ``[0, 2^bits - 1]``).

    Returns:
        ``int32`` tensor ``[packed_numel(values.numel(), bits)]``; padding slots are zero.

    Raises:
        ValueError: bits out of range, non-integer dtype or values outside the range.
    """
    per_word = values_per_word(bits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f'values must be an integer tensor, got {values.dtype}')
    lo, hi = _value_range(bits, signed)
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(f'values must lie in [{lo}, {hi}] for {bits}-bit '
                         f'{"signed" if signed else "unsigned"} packing')
    pad = packed_numel(flat.numel(), bits) * per_word - flat.numel()
    flat = torch.cat([flat, flat.new_zeros(pad)]) & ((1 << bits) - 1)
    shifts = torch.arange(per_word, device=flat.device, dtype=torch.int64) * bits
    words = (flat.view(-1, per_word) << shifts).sum(dim=1)          # in [0, 2^32)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32)


def unpack_int(words: Tensor, bits: int, shape: int | Sequence[int], *, signed: bool) -> Tensor:
    """Inverse of :func:`pack_int`.

    Args:
        words: ``int32`` words from :func:`pack_int`.
        bits: 2..8, as packed.
        shape: shape (or element count) of the original tensor.
        signed: as packed.

    Returns:
        ``int32`` tensor of ``shape``.
    """
    per_word = values_per_word(bits)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    if words.numel() != packed_numel(numel, bits):
        raise ValueError(f'{words.numel()} words cannot hold shape {shape} at {bits} bits '
                         f'(need {packed_numel(numel, bits)})')
    unsigned_words = words.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    flat = ((unsigned_words[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    if signed:
        flat = torch.where(flat >= (1 << (bits - 1)), flat - (1 << bits), flat)
    return flat.to(torch.int32).reshape(shape)
