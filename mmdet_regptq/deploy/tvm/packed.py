"""Bit-packed integer weights of a TVM artifact, and how they are rebuilt at load.

NumPy only: the torch-free runtime (:mod:`mmdet_regptq.deploy.tvm.runner`) unpacks with
these functions. The packing layout is :func:`mmdet_regptq.quant.packing.pack_int`'s
(``32 // bits`` codes per int32 word, little end first, two's complement when signed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ['PackedWeight', 'shift_weight_value', 'unpack_codes', 'unpack_weight']


@dataclass
class PackedWeight:
    """What a backend needs to store an integer weight bit-packed.

    Attributes:
        codes: the original codes ``[C_out, ...]`` (int64, in ``qmin..qmax``).
        zero_point: per-channel zero points ``[C_out]`` (int64).
        qmin: lowest code of the grid.
        qmax: highest code of the grid.
        transpose: the graph's initializer is transposed (Gemm → MatMulInteger ``[K, N]``).
        centred: the graph's initializer is ``codes - zero_point`` (int8, no zero point
            input); otherwise the codes themselves with a ``w_zero_point`` input.
        kind: ``'affine'`` (the above) or ``'shift'``: an LLAQ layer whose codes ``c`` are
            signed shift amounts (``c > 0``: ``+(1 << (c - 1))``, ``c < 0``:
            ``-(1 << (-c - 1))``, 0: the centre) and whose initializer is
            ``[pos; neg; ones]`` (:func:`shift_weight_value`).
    """

    codes: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    transpose: bool = False
    centred: bool = True
    kind: str = 'affine'

    def graph_value(self, codes: np.ndarray | None = None) -> np.ndarray:
        """The graph initializer rebuilt from (unpacked) ``codes``."""
        codes = self.codes if codes is None else codes.astype(np.int64)
        if self.kind == 'shift':
            return shift_weight_value(codes)
        if self.centred:
            value = (codes - self.zero_point.reshape([-1] + [1] * (codes.ndim - 1))
                     ).astype(np.int8)
        else:
            value = codes.astype(np.uint8 if self.qmin >= 0 else np.int8)
        return np.ascontiguousarray(value.T if self.transpose else value)

    @property
    def bits(self) -> int:
        return int(np.ceil(np.log2(self.qmax - self.qmin + 1)))

    @property
    def signed(self) -> bool:
        return self.qmin < 0


def shift_weight_value(codes: np.ndarray) -> np.ndarray:
    """``[pos; neg; ones]`` int8 ``[2 C_out + 1, ...]`` from signed shift codes: the LLAQ
    layer's one integer convolution (positive side, negative side, and the window sum that
    carries the centre ``mu``). The powers of two are made by shifts."""
    one = np.ones_like(codes)
    pos = np.where(codes > 0, one << np.maximum(codes - 1, 0), 0)
    neg = np.where(codes < 0, -(one << np.maximum(-codes - 1, 0)), 0)
    ones = np.ones((1,) + codes.shape[1:], np.int64)
    return np.ascontiguousarray(np.concatenate([pos, neg, ones]).astype(np.int8))


def unpack_codes(words: np.ndarray, bits: int, shape: Sequence[int], *,
                 signed: bool) -> np.ndarray:
    """Inverse of ``pack_int`` in NumPy: int32 ``words`` → int64 codes of ``shape``."""
    per_word = 32 // bits
    numel = int(np.prod(shape)) if len(shape) else 1
    flat = np.asarray(words, np.int64).reshape(-1) & 0xFFFFFFFF
    shifts = np.arange(per_word, dtype=np.int64) * bits
    values = ((flat[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    if signed:
        values = np.where(values >= (1 << (bits - 1)), values - (1 << bits), values)
    return values.reshape(tuple(shape))


def unpack_weight(words: np.ndarray, zero_point: np.ndarray, meta: Mapping[str, Any]
                  ) -> np.ndarray:
    """Rebuild a weight input of the compiled function from its packed storage."""
    codes = unpack_codes(words, meta['bits'], meta['shape'], signed=meta['signed'])
    pw = PackedWeight(codes=codes, zero_point=zero_point.astype(np.int64),
                      qmin=meta['qmin'], qmax=meta['qmax'], transpose=meta['transpose'],
                      centred=meta['centred'], kind=meta.get('kind', 'affine'))
    return pw.graph_value()
