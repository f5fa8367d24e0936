"""A u8 x s8 -> int32 convolution for TVM on x86 CPUs with AVX2 but without AVX-512 VNNI.

Without VNNI, TVM's generic lowering of an integer convolution (``tvm/schedule.py``) was
2.2x slower than FP32 ONNX Runtime on an AVX2-only AMD EPYC. This kernel computes the same
int32 convolution as ``tvm/vnni.py``'s, with AVX2's two-step form of ``vpdpbusd``:

- ``vpmaddubsw`` (``llvm.x86.avx2.pmadd.ub.sw``): 32 unsigned x signed byte products,
  neighbours added in pairs into 16 **int16** lanes (signed saturation);
- ``vpmaddwd`` (``llvm.x86.avx2.pmadd.wd``) with a vector of ones: the int16 pairs added
  into 8 int32 lanes, then added to the int32 accumulator.

Exactness: the unsigned operand is the activation code + 128 (``[0, 255]``), the signed
one the centred weight. A pair sum is at most ``2 * 255 * max|w|`` in magnitude, so it
fits int16 (``|s| <= 32767``) without saturating whenever ``max|w| <= 64``
(:data:`MAX_WEIGHT`: 32640): every 4-bit weight (``|w| <= 8``, or 15 centred asymmetric),
every LLAQ power of two of a 4-bit grid (``<= 64``), and both halves of the split 8-bit
first layer (``|w| <= 16``). Then the result equals the int32 convolution bit for bit.
Wider weights (8-bit grids) could saturate; the converter (``tvm/build.py``) checks each
layer's weights at build time and gives such layers the generic schedule, and the runner
checks again when it loads the weights.

int16 sums: ``vpmaddwd`` (the widening) takes the same multiply ports as ``vpmaddubsw``, so
widening every step halves the throughput. A layer with small weights adds several steps'
pair sums in int16 first (``vpaddw``), as many as ``G * 2 * 255 * max|w| <= 32767`` allows
(:func:`int16_sums`: 8 for 4-bit weights), and widens once per ``G`` input channel blocks
of one tap (:func:`int16_group`). Exact for the same reason: no partial sum leaves int16.
The build records the weight limit this implies (:func:`weight_limit`) for the runner's
check at load.

Layout and tiling are ``tvm/vnni.py``'s with 256-bit vectors: the padded uint8 input
``[N * C/4, H+pads, W+pads, 4]`` built inside in parallel by the same pack
(``tvm/conv_input.py``), the weight
``[K/8, C/4, kh, kw, 8, 4]`` int8 (lifted out of the inference), ``TK`` blocks of 8
output channels x ``TX`` output columns of accumulators (<= 10 of the 16 ymm registers:
the others hold the ones, a broadcast input, the weights and the int16 pair sums; <= 6
with int16 sums, which need as many int16 accumulators again). As
there, the float epilogue that follows (rescale, bias, ReLU, quantize) is fused into the
kernel and computed per tile where the tiles cover whole channel blocks
(:func:`epilogue_fusable_avx2`).
"""
from __future__ import annotations

import functools
from typing import Any

from mmdet_regptq.deploy.tvm.conv_input import conv_geometry, input_pack
from mmdet_regptq.deploy.tvm.schedule import largest_divisor

__all__ = ['MAX_WEIGHT', 'MAX_INT16_SUMS', 'conv_avx2_kernel', 'epilogue_fusable_avx2',
           'int16_group', 'int16_sums', 'weight_limit', 'weights_fit_avx2']

#: The largest weight magnitude whose u8 x s8 pair sums cannot saturate int16:
#: ``2 * 255 * 64 = 32640 <= 32767``.
MAX_WEIGHT = 64
#: the most pair sums added in int16 before widening (returns diminish past it)
MAX_INT16_SUMS = 16
_INT16_MAX = 32767
_MAX_ACCUMULATORS = 10
_MAX_INT16_ACCUMULATORS = 6
LANES = 8


def weights_fit_avx2(max_abs_weight: int | None) -> bool:
    """Whether weights of magnitude ``<= max_abs_weight`` are exact on the AVX2 kernel
    (None: unknown, so not)."""
    return max_abs_weight is not None and 0 <= max_abs_weight <= MAX_WEIGHT


def epilogue_fusable_avx2(k: int, out_w: int) -> bool:
    """Whether the elementwise ops after an AVX2 convolution with ``k`` output channels
    and ``out_w`` output columns may be fused into it: every tile then writes whole blocks
    of ``8 * TK`` channels (``k`` a multiple), so the epilogue is computed per tile."""
    tk, _ = _tiles(-(-k // LANES), out_w)
    return k % (LANES * tk) == 0


def int16_sums(max_abs_weight: int | None) -> int:
    """How many ``vpmaddubsw`` pair sums (each within ``2 * 255 * max|w|``) an int16 lane
    adds without leaving int16: 8 for 4-bit weights (``|w| <= 8``), 4 for the split 8-bit
    layer's halves (``<= 16``), 1 up to ``|w| <= 64``; at most :data:`MAX_INT16_SUMS`."""
    if max_abs_weight is None or max_abs_weight > MAX_WEIGHT:
        return 1
    return min(MAX_INT16_SUMS, _INT16_MAX // (2 * 255 * max(1, int(max_abs_weight))))


def int16_group(c: int, kh: int, kw: int, max_abs_weight: int | None) -> int:
    """The ``sums`` a layer's kernel uses: the largest divisor of its ``ceil(c / 4)`` input
    channel blocks up to :func:`int16_sums`, on windows larger than 1x1 over at least 8
    blocks, else 1 (``benchmarks/avx2_int16.py``: 1.2-1.3x on 64-channel 3x3 convs; slower
    on 1x1 convs and on 16 input channels)."""
    blocks = -(-c // 4)
    if kh * kw == 1 or blocks < 8:
        return 1
    return largest_divisor(blocks, int16_sums(max_abs_weight))


def weight_limit(sums: int) -> int:
    """The largest ``|w|`` for which ``sums`` pair sums stay within int16 (64 for 1)."""
    return _INT16_MAX // (2 * 255 * max(1, int(sums)))


def _pair_sums(T: Any, pixel: Any, weights: Any) -> Any:
    """``vpmaddubsw``: one pixel's 4 input bytes (unsigned, broadcast to the 8 channels)
    times each channel's 4 weights, neighbours added: int16x16."""
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id('llvm.x86.avx2.pmadd.ub.sw'),
        T.reinterpret(T.broadcast(T.reinterpret(pixel, dtype='int32'), 8), dtype='int8x32'),
        weights, dtype='int16x16')


def _widen(T: Any, pairs: Any) -> Any:
    """``vpmaddwd`` with ones: int16x16 pair sums added in pairs into int32x8 (one lane
    per output channel)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('llvm.x86.avx2.pmadd.wd'),
                                   pairs, T.broadcast(T.int16(1), 16), dtype='int32x8')


def _tiles(k_blocks: int, out_w: int, accumulators: int = 10) -> tuple[int, int]:
    """``(TK, TX)``: blocks of 8 channels x output columns per tile, at most
    ``accumulators`` vectors."""
    tk = 2 if k_blocks % 2 == 0 else 1
    tx = largest_divisor(out_w, min(8, accumulators // tk))
    return tk, tx


@functools.lru_cache(maxsize=None)
def conv_avx2_kernel(n: int, c: int, h: int, w: int, k: int, kh: int, kw: int,
                     pads: tuple[int, int, int, int], stride: tuple[int, int],
                     dilation: tuple[int, int], input_dtype: str = 'int8',
                     pad_code: int = 0, sums: int = 1) -> Any:
    """The PrimFunc ``(x, packed weight, shift, out)`` for one shape (the arguments and
    the result as in :func:`mmdet_regptq.deploy.tvm.vnni.conv_vnni_kernel`, the weight
    blocked by 8 output channels: ``[K/8, C/4, kh, kw, 8, 4]``). ``sums``: how many input
    channel blocks' int16 pair sums are added in int16 before they are widened
    (:func:`int16_group`; 1 = every step widened at once)."""
    from tvm.script import tirx as T

    sh, sw = stride
    dh, dw = dilation
    CB, HP, WP, OH, OW = conv_geometry(c, h, w, kh, kw, pads, stride, dilation)
    KO = -(-k // LANES)
    G = int(sums)
    if CB % G:
        raise ValueError(f'sums={sums} must divide the {CB} input channel blocks '
                         '(use int16_group)')
    # int16 sums need a second set of accumulators: fewer of each (measured: 6 best)
    TK, TX = _tiles(KO, OW, _MAX_ACCUMULATORS if G == 1 else _MAX_INT16_ACCUMULATORS)
    XO, PER_IMAGE = OW // TX, KO // TK * OH
    TILES = n * PER_IMAGE
    N, C, H, W, K, KH, KW = n, c, h, w, k, kh, kw
    IN_DTYPE = input_dtype
    pack = input_pack(n, c, h, w, pads, input_dtype, pad_code, 'avx2_pack')

    @T.prim_func(s_tir=True)
    def conv_avx2(x: T.Buffer((N, C, H, W), IN_DTYPE),
                  weight: T.Buffer((KO, CB, KH, KW, 8, 4), 'int8'),
                  shift: T.Buffer((K,), 'int32'),
                  out: T.Buffer((T.int64(N), T.int64(K), T.int64(OH), T.int64(OW)), 'int32')):
        # out's shape in int64 as in the legalized Relax ops: FuseTIR maps one buffer type
        T.func_attr({'tirx.noalias': True, 'regptq_scheduled': True})
        data = T.alloc_buffer((N * CB, HP, WP, 4), 'uint8')
        pack(x, data)
        for t in T.parallel(TILES):
            with T.sblock('avx2_tile'):
                vt = T.axis.spatial(TILES, t)
                T.reads(data[0:N * CB, 0:HP, 0:WP, 0:4], weight[0:KO, 0:CB, 0:KH, 0:KW, 0:8, 0:4],
                        shift[0:K])
                # the rows this tile writes (exact: a fused epilogue is computed at the tile)
                T.writes(out[vt // PER_IMAGE,
                             vt % PER_IMAGE // OH * TK * 8:
                             T.min(vt % PER_IMAGE // OH * TK * 8 + TK * 8, K),
                             vt % OH, 0:OW])
                acc = T.alloc_buffer((TK, TX * 8), 'int32', scope='local')
                acc16 = T.alloc_buffer((TK, TX * 16), 'int16', scope='local')
                # the tile: image, channel block, row (bound values: analysable regions)
                image = T.bind(vt // PER_IMAGE)
                k_block = T.bind(vt % PER_IMAGE // OH * TK)
                y = T.bind(vt % OH)
                for xo in T.serial(XO):
                    for a in T.unroll(TK):
                        for b in T.unroll(TX):
                            acc[a, T.ramp(b * 8, 1, 8)] = T.broadcast(T.int32(0), 8)
                    if G == 1:
                        # each step's int16 pair sums widened at once (its own loop nest:
                        # as the grouped one with G = 1 it measured 1.6-1.9x slower)
                        for cb in T.serial(CB):
                            for qy in T.serial(KH):
                                for qx in T.serial(KW):
                                    for a in T.unroll(TK):
                                        for b in T.unroll(TX):
                                            acc[a, T.ramp(b * 8, 1, 8)] = acc[
                                                a, T.ramp(b * 8, 1, 8)] + _widen(T, _pair_sums(
                                                    T, data.vload(
                                                        [image * CB + cb, y * sh + qy * dh,
                                                         (xo * TX + b) * sw + qx * dw, 0],
                                                        'uint8x4'),
                                                    weight.vload([k_block + a, cb, qy, qx, 0, 0],
                                                                 'int8x32')))
                    else:
                        # per tap, G input channel blocks added in int16, then widened
                        for qy in T.serial(KH):
                            for qx in T.serial(KW):
                                for cbo in T.serial(CB // G):
                                    for a in T.unroll(TK):
                                        for b in T.unroll(TX):
                                            acc16[a, T.ramp(b * 16, 1, 16)] = T.broadcast(
                                                T.int16(0), 16)
                                    for cbi in T.unroll(G):
                                        for a in T.unroll(TK):
                                            for b in T.unroll(TX):
                                                acc16[a, T.ramp(b * 16, 1, 16)] = acc16[
                                                    a, T.ramp(b * 16, 1, 16)] + _pair_sums(
                                                    T, data.vload(
                                                        [image * CB + cbo * G + cbi,
                                                         y * sh + qy * dh,
                                                         (xo * TX + b) * sw + qx * dw, 0],
                                                        'uint8x4'),
                                                    weight.vload([k_block + a, cbo * G + cbi,
                                                                  qy, qx, 0, 0], 'int8x32'))
                                    for a in T.unroll(TK):
                                        for b in T.unroll(TX):
                                            acc[a, T.ramp(b * 8, 1, 8)] = acc[
                                                a, T.ramp(b * 8, 1, 8)] + _widen(
                                                T, acc16[a, T.ramp(b * 16, 1, 16)])
                    # write-back transposed in registers: per output channel one vector
                    # of TX neighbouring columns (a contiguous NCHW store)
                    for a in T.unroll(TK):
                        for ki in T.unroll(8):
                            if (k_block + a) * 8 + ki < K:
                                if TX > 1:
                                    out[image, (k_block + a) * 8 + ki, y,
                                        T.ramp(xo * TX, 1, TX)] = (
                                        acc[a, T.ramp(ki, 8, TX)]
                                        - T.broadcast(shift[(k_block + a) * 8 + ki], TX))
                                else:
                                    out[image, (k_block + a) * 8 + ki, y, xo] = (
                                        acc[a, ki] - shift[(k_block + a) * 8 + ki])

    return conv_avx2
