"""Hand-written CPU schedules for the TIR that TVM Relax legalizes a model into.

TVM's default CPU lowering leaves every operator as a naive single-threaded loop nest
(~100x slower than ONNX Runtime here, BUILD_NOTES.md). Without a MetaSchedule tuning run
(hours on this shared 2-core machine), :func:`schedule_cpu` applies one fixed schedule per
kind of block, after ``LegalizeOps`` / ``FuseTIR``:

- a direct NCHW convolution block (``conv2d_nchw``, int8 x int8 -> int32 or float32):
  output channels split by ``F`` (register tile, unrolled; the first of 8, 6, 5, 4, 3, 2, 1
  that divides them), output columns split by ``V``
  (vectorized, AVX-512 lanes), loops ordered ``n, f_o, y | x_o | rc, ry, rx | f_i, x_i``,
  the ``n, f_o, y`` loops fused and parallel, the accumulator tile in a local buffer
  (``cache_write``) written back once per tile, reduction init split off;
  its padding block is inlined;
- a 2-D matrix product block (``matmul``: ``[M, K] x [K, N]``, a Linear layer / ONNX
  Gemm): rows split by 4 and columns by ``V`` (register tile ``4 x V``, the rows unrolled,
  the columns vectorized), loops ``m_o, n_o | k | m_i, n_i``, ``m_o, n_o`` fused and
  parallel, the accumulator tile in a local buffer;
- a VNNI convolution (``tvm/vnni.py``, written with its own schedule) with the
  elementwise ops after it fused in (float rescale, bias, ReLU, quantize): those ops
  inlined into one block and computed inside the kernel's parallel tile loop, after each
  tile, vectorized (``_schedule_fused_tile``); RetinaNet's ``main`` 1.06x faster;
- in a function without a convolution (a fused chain of casts, rescale, bias, ReLU, adds,
  quantize, clip, resize, layout changes, or a normalization): every spatial block but the
  last inlined into its consumers (one pass over memory);
- every other block without reduction axes: the outer loops fused and parallel, the
  innermost loop vectorized when it is short;
- a reduction block (GroupNorm mean / variance, pooling windows): its leading spatial
  loops fused and parallel; a long one (GroupNorm's statistics) with 4 outputs' add chains
  interleaved inside its loop, a short one (a pooling window) with 16 neighbouring outputs
  as vector lanes inside the window loops; either way every output is reduced in the same
  order as before, so the values are bit-identical.

Any block a rule cannot handle is left unscheduled (logged at DEBUG): the schedule only
changes loop structure, never the computed values (integer results are identical; float
results differ only by summation order).
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ['schedule_cpu', 'cpu_pipeline']

logger = logging.getLogger(__name__)

_LANES = 16           # int32/float32 lanes of a 512-bit vector
#: the tile blocks of our own convolution kernels that an epilogue may be fused into
_TILE_BLOCKS = ('vnni_tile', 'avx2_tile')
#: output-channel register tiles, first that divides: odd ones too, so that e.g. YOLO's
#: 255-channel head (3 x 85) gets 5 accumulator vectors instead of 1 (3.6x slower)
_TILE_F = (8, 6, 5, 4, 3, 2, 1)
#: independent accumulation chains interleaved in a long reduction (``_schedule_reduction``)
_CHAINS = 4
_LONG_REDUCTION = 256
_CHUNK = 8


def _extent(sch: Any, loop: Any) -> int | None:
    try:
        return int(sch.get(loop).extent)
    except (TypeError, ValueError, AttributeError):
        return None


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (a tile that divides evenly)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def _iter_types(sch: Any, block: Any) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _schedule_conv(sch: Any, block: Any) -> None:
    loops = sch.get_loops(block)
    if len(loops) != 7:
        raise ValueError('not a 7-loop NCHW conv')
    n, f, y, x, rc, ry, rx = loops
    f_ext, x_ext = _extent(sch, f), _extent(sch, x)
    tf = next(t for t in _TILE_F if f_ext % t == 0)
    tx = largest_divisor(x_ext, _LANES)
    f_o, f_i = sch.split(f, [None, tf])
    x_o, x_i = sch.split(x, [None, tx])
    sch.reorder(n, f_o, y, x_o, rc, ry, rx, f_i, x_i)
    outer = sch.fuse(n, f_o, y)
    sch.parallel(outer)
    local = sch.cache_write(block, 0, 'local')
    sch.reverse_compute_at(local, x_o)
    sch.unroll(f_i)
    sch.vectorize(x_i)              # before decompose_reduction (needs the init)
    sch.decompose_reduction(block, rc)
    wb_loops = sch.get_loops(local)
    sch.vectorize(wb_loops[-1])


def _schedule_matmul(sch: Any, block: Any) -> None:
    loops = sch.get_loops(block)
    if len(loops) != 3 or _iter_types(sch, block) != [0, 0, 2]:
        raise ValueError('not a 2-D [M, K] x [K, N] matmul')
    m, n, k = loops
    m_ext, n_ext = _extent(sch, m), _extent(sch, n)
    tm = next(t for t in (4, 2, 1) if m_ext % t == 0)
    tn = largest_divisor(n_ext, _LANES)
    m_o, m_i = sch.split(m, [None, tm])
    n_o, n_i = sch.split(n, [None, tn])
    sch.reorder(m_o, n_o, k, m_i, n_i)
    outer = sch.fuse(m_o, n_o)
    sch.parallel(outer)
    local = sch.cache_write(block, 0, 'local')
    sch.reverse_compute_at(local, outer)
    sch.unroll(m_i)
    sch.vectorize(n_i)
    sch.decompose_reduction(block, k)
    sch.vectorize(sch.get_loops(local)[-1])


def _schedule_spatial(sch: Any, block: Any) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        raise ValueError('dynamic extents')
    inner = loops[-1]
    outer = loops[:-1]
    if outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)
    if extents[-1] <= 64 and extents[-1] > 1:
        sch.vectorize(inner)
    elif extents[-1] > 64:
        _, vi = sch.split(inner, [None, largest_divisor(extents[-1], _LANES)])
        sch.vectorize(vi)


def schedule_cpu(mod: Any) -> Any:
    """Apply the fixed schedules (module doc) to every PrimFunc of ``mod``."""
    import tvm
    from tvm import s_tir

    out = mod
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs is not None and 'regptq_scheduled' in func.attrs:
            continue                 # written with its own schedule (tvm/vnni.py)
        sch = s_tir.Schedule(func)
        try:
            root = sch.get_sblock('root')
            blocks = sch.get_child_blocks(root)
        except Exception:  # noqa: BLE001 - no root block: leave the function alone
            continue
        names = [sch.get(b).name_hint for b in blocks]
        if any(n in _TILE_BLOCKS for n in names):
            _schedule_fused_tile(sch, names)        # our kernel with its epilogue fused
            out = _replace(out, gv, sch.mod['main'])
            continue
        changed = _inline_elementwise(sch, names)
        names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock('root'))]
        for name in list(names):
            try:
                block = sch.get_sblock(name)
            except Exception:  # noqa: BLE001 - inlined
                continue
            try:
                if name.startswith('conv2d_nchw'):
                    _schedule_conv(sch, block)
                    changed = True
                elif name == 'matmul':
                    _schedule_matmul(sch, block)
                    changed = True
                elif all(t == 0 for t in _iter_types(sch, block)):
                    _schedule_spatial(sch, block)
                    changed = True
                else:
                    _schedule_reduction(sch, block)
                    changed = True
            except Exception as err:  # noqa: BLE001 - keep what was applied so far
                # each primitive is checked before it changes the schedule, so a failing
                # rule leaves a valid (partly scheduled) function
                logger.debug('%s: block %s left (partly) unscheduled: %s', gv.name_hint,
                             name, err)
        if changed:
            out = _replace(out, gv, sch.mod['main'])
    return out


def _schedule_fused_tile(sch: Any, names: list[str]) -> None:
    """A VNNI or AVX2 convolution (``tvm/vnni.py``, ``tvm/avx2.py``) with the elementwise
    ops that follow it fused in by ``FuseOps`` (its float rescale, bias, ReLU, quantize,
    clip): the ops are inlined into one block, computed inside the kernel's parallel tile
    loop right after each tile (the tile's int32 rows still in cache), its columns
    vectorized. A block that
    cannot be inlined (it writes an output) or moved is moved after the previous one, or
    at worst scheduled alone as a spatial block; the values are the same either way."""
    tile = next(n for n in names if n in _TILE_BLOCKS)
    after = names[names.index(tile) + 1:]
    for name in after[:-1]:
        try:
            sch.compute_inline(sch.get_sblock(name))
        except Exception as err:  # noqa: BLE001 - e.g. writes a function output: keep
            logger.debug('fused tile: block %s not inlined: %s', name, err)
    tile_loop = sch.get_loops(sch.get_sblock(tile))[0]
    for name in after:
        try:
            block = sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - inlined
            continue
        try:
            sch.reverse_compute_at(block, tile_loop)
        except Exception as err:  # noqa: BLE001 - keep it a separate (parallel) loop nest
            logger.debug('fused tile: block %s not moved into the tile: %s', name, err)
            _schedule_spatial(sch, block)
            continue
        try:
            inner = sch.get_loops(block)[-1]
            extent = _extent(sch, inner) or 1
            if extent > 64:
                _, inner = sch.split(inner, [None, largest_divisor(extent, _LANES)])
            if extent > 1:
                sch.vectorize(inner)
        except Exception as err:  # noqa: BLE001 - correct, only not vectorized
            logger.debug('fused tile: block %s not vectorized: %s', name, err)


def _inline_elementwise(sch: Any, names: list[str]) -> bool:
    """Inline every spatial block but the last into its consumers, in a function without
    a convolution (a fused chain of casts, rescale, ReLU, quantize, clip, layout ops, and
    the elementwise parts of a normalization): one pass over memory instead of one per op.
    Returns whether any was inlined."""
    blocks = [sch.get_sblock(n) for n in names]
    if len(blocks) < 2 or any(n.startswith('conv2d') for n in names):
        return False
    changed = False
    for block in blocks[:-1]:
        if not all(t == 0 for t in _iter_types(sch, block)):
            continue
        try:
            sch.compute_inline(block)
            changed = True
        except Exception as err:  # noqa: BLE001 - e.g. a reduction's init reads it: keep
            logger.debug('block %s not inlined: %s', sch.get(block).name_hint, err)
    return changed


def _schedule_reduction(sch: Any, block: Any) -> None:
    """A reduction block (mean / variance of a normalization, pooling windows): its
    leading spatial loops fused and parallel; the reduction loops stay serial.

    A long reduction (>= ``_LONG_REDUCTION`` terms, e.g. GroupNorm's statistics over a
    whole group) is one float add chain per output, latency-bound (one add every ~3
    cycles). Up to ``_CHAINS`` outputs are then moved inside the reduction loops
    (unrolled): their independent chains interleave, each output still summed in the same
    order, so the values are bit-identical and ~10x faster.
    """
    loops = sch.get_loops(block)
    types = _iter_types(sch, block)
    n_spatial = 0
    for t in types:
        if t != 0:
            break
        n_spatial += 1
    spatial = loops[:n_spatial]
    if not spatial or len(loops) != len(types):
        raise ValueError('loops do not follow the block iterators')
    reduce = loops[n_spatial:]
    window = 1
    for lp in reduce:
        window *= _extent(sch, lp) or _LONG_REDUCTION
    if window < _LONG_REDUCTION and all(t == 2 for t in types[n_spatial:]) and \
            _vectorize_short_reduction(sch, block, spatial, reduce):
        return
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    outputs = _extent(sch, fused) or 1
    terms = 1
    for lp in reduce:
        terms *= _extent(sch, lp) or 0
    chains = largest_divisor(outputs, _CHAINS)
    if reduce and chains > 1 and terms >= _LONG_REDUCTION and all(t == 2 for t in
                                                                 types[n_spatial:]):
        outer, inner = sch.split(fused, [None, chains])
        chunk = largest_divisor(_extent(sch, reduce[-1]) or 1, _CHUNK)
        r_o, r_i = sch.split(reduce[-1], [None, chunk])
        sch.reorder(outer, *reduce[:-1], r_o, inner, r_i)
        if outputs // chains > 1:
            sch.parallel(outer)
        sch.decompose_reduction(block, (reduce[:-1] or [r_o])[0])
        sch.unroll(inner)
        sch.unroll(r_i)
        return
    if outputs > 1:
        sch.parallel(fused)


def _vectorize_short_reduction(sch: Any, block: Any, spatial: list, reduce: list) -> bool:
    """A short reduction (a pooling window) over many outputs: ``_LANES`` neighbouring
    outputs of the innermost spatial loop as the vector lanes, inside the window loops
    (each output still reduced in the same order: bit-identical). Returns whether applied."""
    inner = _extent(sch, spatial[-1]) or 1
    lanes = largest_divisor(inner, _LANES)
    if lanes < 8 or not reduce:
        return False
    s_o, s_i = sch.split(spatial[-1], [None, lanes])
    outer = sch.fuse(*spatial[:-1], s_o) if len(spatial) > 1 else s_o
    sch.reorder(outer, *reduce, s_i)
    if (_extent(sch, outer) or 1) > 1:
        sch.parallel(outer)
    sch.vectorize(s_i)              # before decompose_reduction (needs the init)
    sch.decompose_reduction(block, reduce[0])
    return True


def _replace(mod: Any, gv: Any, func: Any) -> Any:
    mod = mod.shallow_copy() if hasattr(mod, 'shallow_copy') else mod
    mod[gv] = func
    return mod


def cpu_pipeline(target: Any) -> Any:
    """TVM's default CPU Relax pipeline with :func:`schedule_cpu` after legalization."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    @tvm.transform.module_pass(opt_level=0, name='RegPTQScheduleCPU')
    def schedule_pass(mod: Any, _ctx: Any) -> Any:
        return schedule_cpu(mod)

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + cpu_generic.legalize_passes(target)
                + [schedule_pass]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target))
            return seq(mod)

    return pipeline
