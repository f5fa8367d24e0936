"""An int8 x int8 -> int32 convolution for TVM on x86 CPUs with AVX-512 VNNI.

TVM's generic lowering of an integer ``conv2d`` (and our fixed schedule in
``tvm/schedule.py``) reaches ~15-20 GMAC/s here; one ``vpdpbusd`` instruction does 64 8-bit
multiply-adds, and the kernel below reaches ~200 GMAC/s on a 64-channel 3x3 conv at
128x128 (``benchmarks/deploy.py`` measures whole models). TVM's own route to VNNI,
``Schedule.tensorize`` with ``dot_16x4_vnni``, crashes in TVM 0.27 (serialising the
intrinsic), so the kernel is written directly in TVMScript with the LLVM intrinsic call.

One PrimFunc per convolution shape, called from Relax with ``call_tir``:

- input ``[N, C, H, W]`` int8 (centred codes), output ``[N, K, OH, OW]`` int32, so the
  float rescale / ReLU / requantize that follows stays a plain elementwise loop; Relax
  ``FuseOps`` fuses that loop into the kernel (``fuse_epilogue``, where ``K`` is a
  multiple of a tile's channels), and ``tvm/schedule.py`` computes it per tile, right
  after the tile's int32 rows are written (still in cache; the int32 buffer shrinks to
  one tile's rows);
- inside, first (in parallel) a padded **uint8** copy of the input in the blocked layout
  ``[N * C/4, H+pads, W+pads, 4]`` = code + 128 (padding = 128, i.e. code 0), one padded
  row per iteration without a bounds test per byte (``tvm/conv_input.py``, shared with the
  AVX2 kernel);
- weight ``[K/16, C/4, kh, kw, 16, 4]`` int8, zero-padded to multiples of 16 and 4, and
  the per-channel ``128 * sum(W[k])``: both computed in Relax from the OIHW weight, so
  ``LiftTransformParams`` moves them out of the inference into a once-at-load function.

``vpdpbusd`` multiplies unsigned by signed bytes, hence the +128 shift, undone exactly by
subtracting ``128 * sum(W[k])`` per output channel. Each product is at most 255 * 128 and
the instruction adds four into int32 without saturation, so the result equals the int32
convolution of the int8 operands bit for bit.

Register tile: ``TK`` blocks of 16 output channels x ``TX`` output columns, one zmm
accumulator each (<= 24); the ``N * K/16/TK * OH`` tiles run in parallel; each tile writes
its accumulators back to NCHW minus the shift (a transpose in registers). Grouped
convolutions run one kernel per group.

Where the row stride is 1 and the output rows are multiples of 16 columns (most layers of
a detector), :func:`conv_vnni_cols_kernel` is used instead: the same packed input and
weights, but 16 neighbouring output **columns** of one channel per accumulator (the
input's 64 contiguous bytes against one channel's weights broadcast), stored without a
transpose: 1.08x on a 64-channel 3x3 conv at 128x128, 2.7x on a 16-to-64-channel 1x1.

The emitters below take ``isa``: ``'vnni'`` (this kernel) or ``'avx2'`` (the same
convolution with ``vpmaddubsw`` + ``vpmaddwd`` on 256-bit vectors, ``tvm/avx2.py``, for
x86 CPUs without VNNI; exact for weights ``|w| <= 64``). :func:`int8_kernel` picks one from
the compile target.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from mmdet_regptq.deploy.tvm.avx2 import LANES as AVX2_LANES
from mmdet_regptq.deploy.tvm.avx2 import conv_avx2_kernel, epilogue_fusable_avx2, int16_group
from mmdet_regptq.deploy.tvm.conv_input import conv_geometry, input_pack, out_size
from mmdet_regptq.deploy.tvm.schedule import largest_divisor

__all__ = ['has_vnni', 'has_avx2', 'int8_kernel', 'INT8_KERNELS', 'conv_vnni_kernel',
           'emit_conv_vnni', 'emit_conv_vnni_wide', 'emit_matmul_vnni', 'vnni_applicable',
           'epilogue_fusable', 'conv_vnni_cols_kernel', 'cols_applicable', 'COLS_TK',
           'emit_conv_vnni_u8_weights']

#: The integer convolution kernels a build can select (``'auto'``: from the target).
INT8_KERNELS = ('auto', 'vnni', 'avx2', 'generic')

_MAX_ACCUMULATORS = 24
#: Relax ``OpPatternKind.kOutEWiseFusable`` (a conv2d-like op elementwise ops fuse into)
_OUT_ELEMWISE_FUSABLE = 4


def _has_feature(target: Any, feature: str) -> bool:
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:  # noqa: BLE001 - not an llvm target / no LLVM
        return False


def has_vnni(target: Any) -> bool:
    """Whether ``target`` (an llvm target) has AVX-512 VNNI."""
    return _has_feature(target, 'avx512vnni')


def has_avx2(target: Any) -> bool:
    """Whether ``target`` (an llvm target) has AVX2."""
    return _has_feature(target, 'avx2')


def int8_kernel(target: Any, requested: str = 'auto') -> str:
    """The integer convolution kernel for ``target`` (its ``mcpu``, not the machine that
    compiles): ``'vnni'`` with AVX-512 VNNI, else ``'avx2'`` with AVX2, else ``'generic'``
    (``tvm/schedule.py``). ``requested`` other than ``'auto'`` forces one; a kernel the
    target cannot execute is refused."""
    if requested not in INT8_KERNELS:
        raise ValueError(f'kernel={requested!r}: expected one of {INT8_KERNELS}')
    if requested == 'auto':
        return 'vnni' if has_vnni(target) else 'avx2' if has_avx2(target) else 'generic'
    needs = {'vnni': has_vnni, 'avx2': has_avx2}.get(requested)
    if needs is not None and not needs(target):
        raise ValueError(f'kernel={requested!r} needs a target with '
                         f'{"AVX-512 VNNI" if requested == "vnni" else "AVX2"}; '
                         f'target {target} has none')
    return requested


def _tiles(k_blocks: int, out_w: int) -> tuple[int, int]:
    tk = 2 if k_blocks % 2 == 0 else 1
    tx = largest_divisor(out_w, min(12, _MAX_ACCUMULATORS // tk))
    return tk, tx


@functools.lru_cache(maxsize=None)
def conv_vnni_kernel(n: int, c: int, h: int, w: int, k: int, kh: int, kw: int,
                     pads: tuple[int, int, int, int], stride: tuple[int, int],
                     dilation: tuple[int, int], input_dtype: str = 'int8',
                     pad_code: int = 0, unsigned_weights: bool = False) -> Any:
    """The PrimFunc ``(x, packed weight, shift, out)`` for one shape.

    ``x`` is the ``[N, C, H, W]`` int8 input, ``out`` the ``[N, K, OH, OW]`` int32 result
    (NCHW, so the float epilogue that follows stays a plain elementwise loop); the
    padded uint8 copy of ``x`` in the blocked layout (module doc) is built inside, in
    parallel, before the tiles run. A ``uint8`` input (codes with a zero point) is used as
    it is and padded with ``pad_code`` (its zero point). With ``unsigned_weights`` the
    operands swap sides: the weight bytes are ``vpdpbusd``'s unsigned operand (8-bit
    codes 0..255) and the input its signed one (``uint8`` codes stored minus 128;
    :func:`emit_conv_vnni_u8_weights`).
    """
    from tvm.script import tirx as T

    sh, sw = stride
    dh, dw = dilation
    CB, HP, WP, OH, OW = conv_geometry(c, h, w, kh, kw, pads, stride, dilation)
    KO = -(-k // 16)
    TK, TX = _tiles(KO, OW)
    XO, PER_IMAGE = OW // TX, KO // TK * OH
    TILES = n * PER_IMAGE
    N, C, H, W, K, KH, KW = n, c, h, w, k, kh, kw
    IN_DTYPE = input_dtype
    SWAP = bool(unsigned_weights)
    pack = input_pack(n, c, h, w, pads, input_dtype, pad_code, 'vnni_pack',
                      signed_codes=SWAP)

    @T.prim_func(s_tir=True)
    def conv_vnni(x: T.Buffer((N, C, H, W), IN_DTYPE),
                  weight: T.Buffer((KO, CB, KH, KW, 16, 4), 'int8'),
                  shift: T.Buffer((K,), 'int32'),
                  out: T.Buffer((T.int64(N), T.int64(K), T.int64(OH), T.int64(OW)), 'int32')):
        # out's shape in int64 as in the legalized Relax ops: FuseTIR maps one buffer type
        T.func_attr({'tirx.noalias': True, 'regptq_scheduled': True})
        data = T.alloc_buffer((N * CB, HP, WP, 4), 'uint8')
        pack(x, data)
        for t in T.parallel(TILES):
            with T.sblock('vnni_tile'):
                vt = T.axis.spatial(TILES, t)
                T.reads(data[0:N * CB, 0:HP, 0:WP, 0:4], weight[0:KO, 0:CB, 0:KH, 0:KW, 0:16, 0:4],
                        shift[0:K])
                # the rows this tile writes (exact: a fused epilogue is computed at the tile)
                T.writes(out[vt // PER_IMAGE,
                             vt % PER_IMAGE // OH * TK * 16:
                             T.min(vt % PER_IMAGE // OH * TK * 16 + TK * 16, K),
                             vt % OH, 0:OW])
                acc = T.alloc_buffer((TK, TX * 16), 'int32', scope='local')
                # the tile: image, channel block, row (bound values, not mutable locals:
                # buffer regions are then analysable, e.g. to shrink a fused epilogue's)
                image = T.bind(vt // PER_IMAGE)
                k_block = T.bind(vt % PER_IMAGE // OH * TK)
                y = T.bind(vt % OH)
                for xo in T.serial(XO):
                    for a in T.unroll(TK):
                        for b in T.unroll(TX):
                            acc[a, T.ramp(b * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
                    for cb in T.serial(CB):
                        for qy in T.serial(KH):
                            for qx in T.serial(KW):
                                for a in T.unroll(TK):
                                    for b in T.unroll(TX):
                                        # one operand unsigned, the other signed: the
                                        # packed input, or with SWAP the weight codes
                                        acc[a, T.ramp(b * 16, 1, 16)] = _vpdpbusd(
                                            T, acc[a, T.ramp(b * 16, 1, 16)],
                                            *_operands(SWAP, _broadcast4(T, data.vload(
                                                [image * CB + cb, y * sh + qy * dh,
                                                 (xo * TX + b) * sw + qx * dw, 0], 'uint8x4')),
                                                weight.vload([k_block + a, cb, qy, qx, 0, 0],
                                                             'int8x64')))
                    # write-back transposed in registers: per output channel one vector
                    # of TX neighbouring columns (a contiguous NCHW store)
                    for a in T.unroll(TK):
                        for ki in T.unroll(16):
                            if (k_block + a) * 16 + ki < K:
                                out[image, (k_block + a) * 16 + ki, y, T.ramp(xo * TX, 1, TX)] = (
                                    acc[a, T.ramp(ki, 16, TX)]
                                    - T.broadcast(shift[(k_block + a) * 16 + ki], TX))

    return conv_vnni


def _vpdpbusd(T: Any, acc: Any, unsigned: Any, signed: Any) -> Any:
    """``acc`` (int32x16) plus the 4-byte dot products of ``unsigned`` and ``signed``
    (int8x64 each)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('llvm.x86.avx512.vpdpbusd.512'),
                                   acc, unsigned, signed, dtype='int32x16')


def _broadcast4(T: Any, four_bytes: Any) -> Any:
    """4 bytes repeated over the 64 byte lanes of a zmm register (int8x64)."""
    return T.reinterpret(T.broadcast(T.reinterpret(four_bytes, dtype='int32'), 16),
                         dtype='int8x64')


def _operands(swap: bool, packed_input: Any, weights: Any) -> tuple[Any, Any]:
    """``vpdpbusd``'s (unsigned, signed) operands: the packed input codes and the weights,
    or with ``swap`` (uint8 weight codes, :func:`emit_conv_vnni_u8_weights`) the other way
    round."""
    return (weights, packed_input) if swap else (packed_input, weights)


#: output channels per tile of the column-lane kernel (:func:`conv_vnni_cols_kernel`), at
#: most; a K it does not divide gets the largest divisor of K from 4 up, so every tile is
#: whole (e.g. K = 54, a RetinaNet class map: 6) and the epilogue can be fused
COLS_TK = 8


def _cols_tiles(k: int, out_w: int) -> tuple[int, int]:
    """``(TK, TV)`` of the column-lane kernel: channels per tile, 16-column vectors per
    step (at most 24 accumulators)."""
    tk = largest_divisor(k, COLS_TK)
    tk = tk if tk >= 4 else COLS_TK
    tv = largest_divisor(out_w // 16, 3 if tk == COLS_TK else _MAX_ACCUMULATORS // tk)
    return tk, tv


def cols_applicable(stride_w: int, out_w: int) -> bool:
    """Whether :func:`conv_vnni_cols_kernel` takes a convolution: stride 1 along the row
    (16 neighbouring output columns read 64 contiguous packed bytes) and whole vectors of
    16 output columns."""
    return stride_w == 1 and out_w % 16 == 0


@functools.lru_cache(maxsize=None)
def conv_vnni_cols_kernel(n: int, c: int, h: int, w: int, k: int, kh: int, kw: int,
                          pads: tuple[int, int, int, int], stride: tuple[int, int],
                          dilation: tuple[int, int], input_dtype: str = 'int8',
                          pad_code: int = 0) -> Any:
    """The VNNI convolution with output **columns** as the vector lanes (stride 1 along
    rows, ``OW`` a multiple of 16; :func:`cols_applicable`): the same arguments, weight
    layout and result as :func:`conv_vnni_kernel`.

    One ``vpdpbusd`` takes 16 neighbouring pixels of four input channels (64 contiguous
    bytes of the packed input) against one output channel's four weights broadcast, so
    an accumulator holds 16 neighbouring output columns of one channel: it is stored to
    NCHW as it is, where :func:`conv_vnni_kernel` (channels as lanes) transposes in
    registers, which costs as much as the products in a 1x1 conv of few channels. Tile:
    ``TK`` output channels (:data:`COLS_TK`) x ``TV`` vectors of 16 columns of one row.
    """
    from tvm.script import tirx as T

    sh, _ = stride
    dh, dw = dilation
    CB, HP, WP, OH, OW = conv_geometry(c, h, w, kh, kw, pads, stride, dilation)
    if not cols_applicable(stride[1], OW):
        raise ValueError(f'column-lane kernel: stride {stride}, {OW} output columns; needs '
                         'stride 1 along the row and a multiple of 16 columns')
    KO = -(-k // 16)
    TK, TV = _cols_tiles(k, OW)
    XO, PER_IMAGE = OW // (16 * TV), -(-k // TK) * OH      # tiles: TK channels of one row
    TILES = n * PER_IMAGE
    N, C, H, W, K, KH, KW = n, c, h, w, k, kh, kw
    IN_DTYPE = input_dtype
    pack = input_pack(n, c, h, w, pads, input_dtype, pad_code, 'vnni_pack')

    @T.prim_func(s_tir=True)
    def conv_vnni_cols(x: T.Buffer((N, C, H, W), IN_DTYPE),
                       weight: T.Buffer((KO, CB, KH, KW, 16, 4), 'int8'),
                       shift: T.Buffer((K,), 'int32'),
                       out: T.Buffer((T.int64(N), T.int64(K), T.int64(OH), T.int64(OW)),
                                     'int32')):
        T.func_attr({'tirx.noalias': True, 'regptq_scheduled': True})
        data = T.alloc_buffer((N * CB, HP, WP, 4), 'uint8')
        pack(x, data)
        for t in T.parallel(TILES):
            with T.sblock('vnni_tile'):
                vt = T.axis.spatial(TILES, t)
                T.reads(data[0:N * CB, 0:HP, 0:WP, 0:4], weight[0:KO, 0:CB, 0:KH, 0:KW, 0:16, 0:4],
                        shift[0:K])
                T.writes(out[vt // PER_IMAGE,
                             vt % PER_IMAGE // OH * TK:
                             T.min(vt % PER_IMAGE // OH * TK + TK, K),
                             vt % OH, 0:OW])
                acc = T.alloc_buffer((TK, TV * 16), 'int32', scope='local')
                image = T.bind(vt // PER_IMAGE)
                channel = T.bind(vt % PER_IMAGE // OH * TK)     # first output channel
                y = T.bind(vt % OH)
                for xo in T.serial(XO):
                    for a in T.unroll(TK):
                        for b in T.unroll(TV):
                            acc[a, T.ramp(b * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
                    for cb in T.serial(CB):
                        for qy in T.serial(KH):
                            for qx in T.serial(KW):
                                for a in T.unroll(TK):
                                    for b in T.unroll(TV):
                                        acc[a, T.ramp(b * 16, 1, 16)] = _vpdpbusd(
                                            T, acc[a, T.ramp(b * 16, 1, 16)],
                                            T.reinterpret(data.vload(
                                                [image * CB + cb, y * sh + qy * dh,
                                                 (xo * TV + b) * 16 + qx * dw, 0], 'uint8x64'),
                                                dtype='int8x64'),
                                            _broadcast4(T, weight.vload(
                                                [(channel + a) // 16, cb, qy, qx,
                                                 (channel + a) % 16, 0], 'int8x4')))
                    for a in T.unroll(TK):
                        for b in T.unroll(TV):
                            if channel + a < K:
                                out[image, channel + a, y,
                                    T.ramp((xo * TV + b) * 16, 1, 16)] = (
                                    acc[a, T.ramp(b * 16, 1, 16)]
                                    - T.broadcast(shift[channel + a], 16))

    return conv_vnni_cols


def epilogue_fusable(k: int, out_w: int, stride_w: int = 1) -> bool:
    """Whether the elementwise ops after a VNNI convolution with ``k`` output channels,
    ``out_w`` output columns and row stride ``stride_w`` may be fused into it: every tile
    then writes whole blocks of channels (``COLS_TK`` on the column-lane kernel, ``16 *
    TK`` on the other; ``k`` a multiple), so the epilogue is computed per tile."""
    if cols_applicable(stride_w, out_w):
        return k % _cols_tiles(k, out_w)[0] == 0
    return _whole_row_tiles(k, out_w)


def _whole_row_tiles(k: int, out_w: int) -> bool:
    """Whether :func:`conv_vnni_kernel`'s tiles (``16 * TK`` channels) cover ``k`` output
    channels exactly, so that an epilogue fused into it is computed per tile."""
    tk, _ = _tiles(-(-k // 16), out_w)
    return k % (16 * tk) == 0


def vnni_applicable(x_dtype: str, w_dtype: str, has_zero_points: bool) -> bool:
    """The kernel covers centred int8 x int8 operands without zero points."""
    return x_dtype == 'int8' and w_dtype == 'int8' and not has_zero_points


def _pair(value: Any) -> list[int]:
    values = [int(value)] if isinstance(value, int) else [int(v) for v in value]
    return values * 2 if len(values) == 1 else values


def _pads(value: Any) -> list[int]:
    """ONNX ``pads`` → ``[top, left, bottom, right]``."""
    values = [int(value)] if isinstance(value, int) else [int(v) for v in value]
    if len(values) == 1:
        return values * 4
    return values * 2 if len(values) == 2 else values


def emit_conv_vnni(bb: Any, x: Any, w: Any, strides: Any, pads: Any,
                   dilations: Any, groups: int = 1, x_zero_point: int | None = None,
                   isa: str = 'vnni', fuse_epilogue: bool = False,
                   max_weight: int | None = None) -> Any:
    """Relax: int32 ``conv2d(x, w)`` (NCHW / OIHW, int8 operands) through the VNNI kernel
    (``isa='vnni'``) or the AVX2 kernel (``isa='avx2'``: ``w`` must be within
    ``|w| <= 64``, which the caller checks: ``avx2.weights_fit_avx2``).

    Args:
        bb: the frontend's BlockBuilder.
        x: ``[N, C, H, W]`` int8.
        w: ``[K, C / groups, kh, kw]`` int8.
        strides, dilations: ONNX attributes (int or pair).
        pads: ONNX ``pads`` (``[top, left, bottom, right]``, or an int).
        groups: grouped convolutions run one kernel per group, concatenated.
        x_zero_point: for a ``uint8`` ``x`` (codes): its zero point; the result is then
            the convolution of ``x - x_zero_point``.
        fuse_epilogue: let Relax ``FuseOps`` fuse the elementwise ops that follow (the
            float rescale, bias, ReLU, quantize) into the kernel (``op_pattern``
            ``kOutEWiseFusable``), computed per tile right after it
            (``schedule._schedule_fused_tile``): the int32 result is read back from cache
            instead of a separate pass over memory. Ungrouped, and only where
            :func:`epilogue_fusable` (AVX2: ``avx2.epilogue_fusable_avx2``); the caller passes it where only elementwise ops can
            follow (not the split 8-bit layer or a matrix product).
        max_weight: ``max |w|`` of ``w`` (AVX2 kernel: the smaller it is, the more
            ``vpmaddubsw`` pair sums are added in int16 before widening,
            ``avx2.int16_group``; None = up to 64).

    Returns:
        ``[N, K, OH, OW]`` int32, equal to the integer convolution.
    """
    from tvm import relax

    if groups > 1:
        xs = bb.normalize(relax.op.split(x, groups, axis=1))
        ws = bb.normalize(relax.op.split(w, groups, axis=0))
        parts = [bb.normalize(emit_conv_vnni(
            bb, bb.normalize(relax.TupleGetItem(xs, g)), bb.normalize(relax.TupleGetItem(ws, g)),
            strides, pads, dilations, 1, x_zero_point, isa, max_weight=max_weight))
            for g in range(groups)]
        return relax.op.concat(parts, axis=1)

    n, c, h, wd = (int(d) for d in x.ty.shape)
    k, _, kh, kw = (int(d) for d in w.ty.shape)
    sh, sw = _pair(strides)
    dh, dw = _pair(dilations)
    pt, pl, pb, pr = _pads(pads)
    if isa not in ('vnni', 'avx2'):
        raise ValueError(f"isa={isa!r}: expected 'vnni' or 'avx2'")
    lanes = 16 if isa == 'vnni' else AVX2_LANES
    cp, kp = -(-c // 4) * 4, -(-k // lanes) * lanes
    w_padded = relax.op.nn.pad(w, [0, kp - k, 0, cp - c, 0, 0, 0, 0], pad_value=0.0)
    weight = bb.normalize(relax.op.permute_dims(
        relax.op.reshape(w_padded, (kp // lanes, lanes, cp // 4, 4, kh, kw)),
        [0, 2, 4, 5, 1, 3]))
    unsigned = str(x.ty.dtype) == 'uint8'
    offset = int(x_zero_point) if unsigned else 128
    shift = bb.normalize(relax.op.multiply(
        relax.op.sum(relax.op.astype(w, 'int32'), axis=[1, 2, 3]),
        relax.const(offset, 'int32')))
    pads4 = (pt, pl, pb, pr)
    out_h, out_w = out_size(h, pt + pb, kh, sh, dh), out_size(wd, pl + pr, kw, sw, dw)
    cols = isa == 'vnni' and cols_applicable(sw, out_w)
    build_kernel = (conv_vnni_cols_kernel if cols else conv_vnni_kernel) if isa == 'vnni' \
        else conv_avx2_kernel
    sums = int16_group(c, kh, kw, max_weight) if isa == 'avx2' else 1
    kernel = build_kernel(n, c, h, wd, k, kh, kw, pads4, (sh, sw), (dh, dw),
                          'uint8' if unsigned else 'int8', offset if unsigned else 0,
                          **({'sums': sums} if isa == 'avx2' else {}))
    label = f'{isa}_cols' if cols else isa
    prefix = f'conv_{label}_u8z{offset}_' if unsigned else f'conv_{label}_'
    name = (f'{prefix}n{n}_c{c}_k{k}_{h}x{wd}_{kh}x{kw}_s{sh}x{sw}_d{dh}x{dw}_'
            f'p{"_".join(map(str, pads4))}' + (f'_i16x{sums}' if sums > 1 else ''))
    kernel = kernel.with_attr('global_symbol', name)
    if fuse_epilogue and (epilogue_fusable(k, out_w, sw) if isa == 'vnni'
                          else epilogue_fusable_avx2(k, out_w)):
        kernel = kernel.with_attr('op_pattern', _OUT_ELEMWISE_FUSABLE)
    gv = bb.add_func(kernel, name)
    return relax.call_tir(gv, [x, weight, shift],
                          relax.TensorType((n, k, out_h, out_w), 'int32'))


def emit_conv_vnni_wide(bb: Any, x: Any, w: Any, strides: Any, pads: Any, dilations: Any,
                        groups: int, x_zero_point: int, isa: str = 'vnni') -> Any:
    """Relax: int32 ``conv2d(x - z_x, w)`` for uint8 codes ``x`` and centred 8-bit weights
    ``w`` in ``[-255, 255]`` (int16; the 8-bit first layer), on the VNNI kernel.

    ``w`` does not fit int8, so it is split exactly as ``w = 16 * hi + lo`` with
    ``lo = w & 15`` in ``[0, 15]`` and ``hi = w >> 4`` in ``[-16, 15]``; one kernel call
    computes both halves as ``2K`` output channels, combined as ``16 * hi_part + lo_part``
    (both halves within ``|w| <= 16``: exact on the AVX2 kernel too).
    """
    from tvm import relax

    k = int(w.ty.shape[0])
    lo = relax.op.bitwise_and(w, relax.const(15, 'int16'))
    hi = relax.op.right_shift(w, relax.const(4, 'int16'))
    if groups > 1:   # keep each group's hi and lo filters inside that group's block of 2K/g
        parts = []
        per = k // groups
        for g in range(groups):
            sl = dict(axes=[0], begin=[g * per], end=[(g + 1) * per])
            parts += [relax.op.strided_slice(hi, **sl), relax.op.strided_slice(lo, **sl)]
        both = relax.op.concat(parts, axis=0)
    else:
        both = relax.op.concat([hi, lo], axis=0)
    both = bb.normalize(relax.op.astype(both, 'int8'))
    acc = bb.normalize(emit_conv_vnni(bb, x, both, strides, pads, dilations, groups,
                                      x_zero_point, isa, max_weight=16))
    if groups > 1:
        per = k // groups
        outs = []
        for g in range(groups):
            base = 2 * g * per
            h_part = relax.op.strided_slice(acc, axes=[1], begin=[base], end=[base + per])
            l_part = relax.op.strided_slice(acc, axes=[1], begin=[base + per],
                                            end=[base + 2 * per])
            outs.append(relax.op.add(relax.op.multiply(h_part, relax.const(16, 'int32')),
                                     l_part))
        return relax.op.concat(outs, axis=1)
    h_part = relax.op.strided_slice(acc, axes=[1], begin=[0], end=[k])
    l_part = relax.op.strided_slice(acc, axes=[1], begin=[k], end=[2 * k])
    return relax.op.add(relax.op.multiply(h_part, relax.const(16, 'int32')), l_part)


def emit_conv_vnni_u8_weights(bb: Any, x: Any, w: Any, w_zero_point: Any, strides: Any,
                              pads: Any, dilations: Any, x_zero_point: int) -> Any:
    """Relax: int32 ``conv2d(x - z_x, w - z_w)`` for uint8 codes ``x`` (constant zero point
    ``z_x``) and **uint8** weight codes ``w`` ``[K, C, kh, kw]`` with zero points ``z_w``
    (a scalar or one per output channel; None: 0): the 8-bit first layer, in one VNNI
    kernel call of ``K`` channels instead of :func:`emit_conv_vnni_wide`'s ``2K``.

    ``w - z_w`` spans up to [-255, 255], but the codes ``w`` fit ``vpdpbusd``'s unsigned
    operand and ``x - 128`` its signed one, so the kernel computes
    ``S = sum w (x - 128) + (128 - z_x) sum w = sum w (x - z_x)`` (padding is ``x = z_x``,
    so every tap counts alike), and

        conv(x - z_x, w - z_w) = S - z_w * sum_window(x - z_x)

    with the window sums of ``x - z_x`` over the input channels (one-channel float
    convolutions with ones, a row then a column; exact: integers below 2^24). Every step
    is an exact integer.
    """
    from tvm import relax

    n, c, h, wd = (int(d) for d in x.ty.shape)
    k, _, kh, kw = (int(d) for d in w.ty.shape)
    sh, sw = _pair(strides)
    dh, dw = _pair(dilations)
    pt, pl, pb, pr = _pads(pads)
    cp, kp = -(-c // 4) * 4, -(-k // 16) * 16
    w8 = bb.normalize(relax.op.astype(w, 'int8'))         # the same bytes, 0..255 as read
    w_padded = relax.op.nn.pad(w8, [0, kp - k, 0, cp - c, 0, 0, 0, 0], pad_value=0.0)
    weight = bb.normalize(relax.op.permute_dims(
        relax.op.reshape(w_padded, (kp // 16, 16, cp // 4, 4, kh, kw)), [0, 2, 4, 5, 1, 3]))
    sum_w = relax.op.sum(relax.op.astype(w, 'int32'), axis=[1, 2, 3])
    shift = bb.normalize(relax.op.multiply(sum_w, relax.const(int(x_zero_point) - 128,
                                                              'int32')))
    pads4 = (pt, pl, pb, pr)
    out_h, out_w = out_size(h, pt + pb, kh, sh, dh), out_size(wd, pl + pr, kw, sw, dw)
    kernel = conv_vnni_kernel(n, c, h, wd, k, kh, kw, pads4, (sh, sw), (dh, dw), 'uint8',
                              int(x_zero_point), unsigned_weights=True)
    name = (f'conv_vnni_u8w_z{x_zero_point}_n{n}_c{c}_k{k}_{h}x{wd}_{kh}x{kw}_s{sh}x{sw}_'
            f'd{dh}x{dw}_p{"_".join(map(str, pads4))}')
    kernel = kernel.with_attr('global_symbol', name)
    if _whole_row_tiles(k, out_w):               # the epilogue may fuse
        kernel = kernel.with_attr('op_pattern', _OUT_ELEMWISE_FUSABLE)
    gv = bb.add_func(kernel, name)
    acc = bb.normalize(relax.call_tir(gv, [x, weight, shift],
                                      relax.TensorType((n, k, out_h, out_w), 'int32')))
    if w_zero_point is None:
        return acc
    centred = relax.op.subtract(relax.op.astype(x, 'int32'),
                                relax.const(int(x_zero_point), 'int32'))
    summed = relax.op.astype(relax.op.sum(centred, axis=[1], keepdims=True), 'float32')
    # the window sums as a row pass then a column pass of ones (14 adds an output, not 49)
    rows = relax.op.nn.conv2d(summed, relax.const(np.ones((1, 1, 1, kw), np.float32)),
                              strides=(1, sw), padding=(0, pl, 0, pr), dilation=(1, dw))
    window = relax.op.astype(relax.op.nn.conv2d(
        rows, relax.const(np.ones((1, 1, kh, 1), np.float32)), strides=(sh, 1),
        padding=(pt, 0, pb, 0), dilation=(dh, 1)), 'int32')
    z_w = bb.normalize(relax.op.astype(w_zero_point, 'int32'))
    z_w = relax.op.reshape(relax.op.broadcast_to(relax.op.reshape(z_w, (-1,)), (k,)),
                           (1, k, 1, 1))
    return relax.op.subtract(acc, relax.op.multiply(z_w, window))


def emit_matmul_vnni(bb: Any, a: Any, b: Any, isa: str = 'vnni',
                     max_weight: int | None = None) -> Any:
    """Relax: int32 ``a @ b`` (``[M, K]`` x ``[K, N]``, int8) through the VNNI kernel.

    A matrix product is a 1x1 convolution of a ``1 x M`` image with ``K`` channels: the
    ``M`` rows (RoIs of the box head) become output columns, which the kernel tiles for
    weight reuse. Transposing ``a`` (``M x K`` bytes) and the int32 result is cheap next to
    the product; ``b``'s layout change depends on the weight only, so it is lifted out of
    the inference like a convolution's.
    """
    from tvm import relax

    m, k = (int(d) for d in a.ty.shape)
    n = int(b.ty.shape[1])
    x = bb.normalize(relax.op.reshape(relax.op.permute_dims(a, [1, 0]), (1, k, 1, m)))
    w = bb.normalize(relax.op.reshape(relax.op.permute_dims(b, [1, 0]), (n, k, 1, 1)))
    acc = bb.normalize(emit_conv_vnni(bb, x, w, 1, 0, 1, isa=isa, max_weight=max_weight))
    return relax.op.permute_dims(relax.op.reshape(acc, (n, m)), [1, 0])
