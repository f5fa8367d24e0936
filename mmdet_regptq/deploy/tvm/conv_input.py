"""The padded, channel-interleaved uint8 input both int8 convolution kernels read.

``tvm/vnni.py`` (``vpdpbusd``) and ``tvm/avx2.py`` (``vpmaddubsw`` + ``vpmaddwd``) both add
four neighbouring input channels into one int32 lane, so both read the input as
``[N * C/4, H+pads, W+pads, 4]`` uint8: code + 128 for int8 input (padding 128, i.e. code
0), or the uint8 codes as they are (padding: their zero point). The kernels differ only in
the weight blocking (16 or 8 output channels) and the instructions; this module holds what
they share: the geometry and the pack, a TVMScript macro each kernel calls first.

The pack runs one padded row per parallel iteration: a padding row is filled, an interior
row gets its border columns filled, then its ``W`` columns written with four channels
each, read along ``x``'s rows. No bounds test per byte, so LLVM vectorizes the row; a
bounds-tested byte loop cost 10-30 % of a 64-channel 3x3 conv.
"""
from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ['QUAD', 'ConvGeometry', 'conv_geometry', 'input_pack', 'out_size']

#: Input channels interleaved per int32 lane (and per packed pixel).
QUAD = 4


class ConvGeometry(NamedTuple):
    """Sizes of one convolution: ``quads`` = ``ceil(C / 4)``, the padded input
    ``padded_h x padded_w``, the output ``out_h x out_w``."""

    quads: int
    padded_h: int
    padded_w: int
    out_h: int
    out_w: int


def out_size(size: int, pad_sum: int, kernel: int, stride: int, dilation: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + pad_sum - dilation * (kernel - 1) - 1) // stride + 1


def conv_geometry(c: int, h: int, w: int, kh: int, kw: int,
                  pads: tuple[int, int, int, int], stride: tuple[int, int],
                  dilation: tuple[int, int]) -> ConvGeometry:
    """The geometry of a ``[*, C, H, W]`` input convolved with a ``kh x kw`` kernel;
    ``pads`` is ``(top, left, bottom, right)``."""
    pt, pl, pb, pr = pads
    return ConvGeometry(-(-c // QUAD), h + pt + pb, w + pl + pr,
                        out_size(h, pt + pb, kh, stride[0], dilation[0]),
                        out_size(w, pl + pr, kw, stride[1], dilation[1]))


def input_pack(n: int, c: int, h: int, w: int, pads: tuple[int, int, int, int],
               input_dtype: str, pad_code: int, name: str, signed_codes: bool = False) -> Any:
    """A TVMScript macro ``pack(x, data)``: fills ``data`` ``[N * C/4, H+pads, W+pads, 4]``
    uint8 from ``x`` ``[N, C, H, W]`` (module doc), in parallel over the padded rows.

    Args:
        n, c, h, w: the shape of ``x``.
        pads: ``(top, left, bottom, right)``.
        input_dtype: ``'int8'`` (centred codes: stored + 128, padded with 128) or
            ``'uint8'`` (stored as they are, padded with ``pad_code``).
        pad_code: the padding value of a ``uint8`` input (its zero point).
        name: the name of the pack's block (``'vnni_pack'``, ``'avx2_pack'``).
        signed_codes: a ``uint8`` input stored as ``code - 128`` in int8 bits (padded with
            ``pad_code - 128``), for a kernel that takes the input as the signed operand.
    """
    from tvm.script import tirx as T

    if input_dtype not in ('int8', 'uint8'):
        raise ValueError(f"input_dtype={input_dtype!r}: expected 'int8' or 'uint8'")
    pt, pl, _, _ = pads
    geo = conv_geometry(c, h, w, 1, 1, pads, (1, 1), (1, 1))
    N, C, H, W, PT, PL = n, c, h, w, pt, pl
    CB, HP, WP, ROWS = geo.quads, geo.padded_h, geo.padded_w, n * geo.quads * geo.padded_h
    NAME = name
    SHIFT, PAD = (128, 128) if input_dtype == 'int8' else (0, pad_code)
    if signed_codes:
        if input_dtype != 'uint8':
            raise ValueError('signed_codes: only for a uint8 input')
        SHIFT, PAD = 128, (pad_code + 128) % 256       # x - 128 as an int8 bit pattern

    @T.macro
    def pack(x, data):
        for row in T.parallel(ROWS):
            with T.sblock(NAME):
                vr = T.axis.spatial(ROWS, row)
                T.reads(x[0:N, 0:C, 0:H, 0:W])
                T.writes(data[vr // HP, vr % HP, 0:WP, 0:4])
                if vr % HP >= PT and vr % HP < H + PT:
                    # border columns, then the row itself: four channels interleaved,
                    # read along x's rows (no per-byte bounds check: vectorizable)
                    for col, ci in T.grid(PL, 4):
                        data[vr // HP, vr % HP, col, ci] = T.uint8(PAD)
                    for col, ci in T.grid(WP - W - PL, 4):
                        data[vr // HP, vr % HP, W + PL + col, ci] = T.uint8(PAD)
                    for col in T.serial(W):
                        for ci in T.unroll(4):
                            data[vr // HP, vr % HP, col + PL, ci] = T.Select(
                                (vr // HP) % CB * 4 + ci < C,
                                T.Cast('uint8', T.Cast('int32', x[
                                    vr // HP // CB, T.min((vr // HP) % CB * 4 + ci, C - 1),
                                    vr % HP - PT, col]) + SHIFT),
                                T.uint8(PAD))
                else:
                    for col, ci in T.grid(WP, 4):
                        data[vr // HP, vr % HP, col, ci] = T.uint8(PAD)

    return pack
