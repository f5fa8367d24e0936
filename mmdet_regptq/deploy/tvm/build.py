"""Compile ONNX models with TVM Relax for the CPU, and run the compiled artifact.

An artifact is a directory with three files:

- ``model.so``: the Relax VM executable for ``llvm`` with the target CPU (``mcpu``: by
  default LLVM's host detection, e.g. ``znver4``; any LLVM CPU name, e.g. ``haswell``, to
  build for another machine; JSON-dict target, TVM 0.27);
- ``weights.npz``: the integer weights that are *inputs* of the compiled function, each
  **bit-packed** (``pack_int``: eight 4-bit codes per int32 word for <= 4-bit grids, as
  HAWQ), with its per-channel zero points; unpacked once when the artifact is loaded;
- ``meta.json``: input/output names and shapes, the weight order, grids, the target.

The INT4 model is the integer graph of :func:`to_integer_graph`: ``ConvInteger`` and
``MatMulInteger`` (the frontend's int32 matmul), a float rescale per output channel, and
our activation QuantizeLinear/Clip as Relax ``quantize`` + integer ``clip``. The integer
convolution kernel is chosen from the TARGET (``vnni.int8_kernel``): with AVX-512 VNNI,
int8 x int8 ``ConvInteger`` (LLAQ layers too: their power-of-two weights, stored as packed
shift codes and expanded with shifts at load) and the 8-bit first layer run the
``vpdpbusd`` kernel of ``tvm/vnni.py``; with AVX2 but no VNNI the ``vpmaddubsw`` +
``vpmaddwd`` kernel of ``tvm/avx2.py``, for layers whose weights are within ``|w| <= 64``
(checked here, on the weight values, at build time: no int16 saturation); both exact
int32. Otherwise a Relax ``nn.conv2d`` with ``out_dtype='int32'``, or float32 lanes where
every partial sum is an integer below 2^24 (exact). ``meta.json``'s ``kernels`` says
which, per layer. Weight layout changes (the VNNI blocking) are lifted out of
``main`` by Relax ``LiftTransformParams`` into ``main_transform_params``, which
``tvm.runner.TvmRunner`` runs once when it loads the artifact. Everything else (residual
adds, ReLU, pooling, resize, the FP final layers) is float, with its constants compiled in.
TVM's ONNX frontend has no ``ConvInteger`` converter; :func:`extra_onnx_converters` adds
one for the duration of a conversion.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx

from mmdet_regptq.deploy.tvm.fast_sigmoid import fast_sigmoid_pass
from mmdet_regptq.deploy.tvm.integer_graph import IntegerReport, PackedWeight, to_integer_graph
from mmdet_regptq.deploy.tvm.runner import ARTIFACT_FILES
from mmdet_regptq.deploy.tvm.schedule import cpu_pipeline
from mmdet_regptq.deploy.tvm.avx2 import int16_group, weights_fit_avx2
from mmdet_regptq.deploy.tvm.avx2 import weight_limit as avx2_weight_limit
from mmdet_regptq.deploy.tvm.vnni import (emit_conv_vnni, emit_conv_vnni_u8_weights,
                                          emit_conv_vnni_wide, emit_matmul_vnni, int8_kernel,
                                          vnni_applicable)
from mmdet_regptq.quant.packing import pack_int

__all__ = ['host_target', 'deploy_target', 'TARGET_CPU_MCPU', 'extra_onnx_converters',
           'compile_onnx', 'build_artifact', 'ARTIFACT_FILES']

logger = logging.getLogger(__name__)


def host_target(mcpu: str | None = None) -> Any:
    """``llvm`` target for CPU ``mcpu`` (an LLVM CPU name, e.g. ``haswell``, ``znver2``;
    None: this machine's), in the JSON-dict form TVM 0.27 wants."""
    import tvm
    from tvm.target import codegen

    if mcpu is None:
        mcpu = str(codegen.llvm_get_system_cpu())
    elif not isinstance(mcpu, str) or not mcpu:
        raise ValueError(f'mcpu={mcpu!r}: expected an LLVM CPU name (e.g. haswell) or None')
    if not codegen.llvm_is_valid_cpu(mcpu, str(codegen.llvm_get_system_triple())):
        known = ', '.join(str(c) for c in codegen.llvm_get_cpu_archlist(
            tvm.target.Target({'kind': 'llvm'})))
        raise ValueError(f'mcpu={mcpu!r} is not a CPU LLVM knows; known: {known}')
    return tvm.target.Target({'kind': 'llvm', 'mcpu': mcpu})


#: ``regptq.target_cpu`` / ``tools/deploy.py --target-cpu`` → LLVM ``mcpu``: ``'avx2'`` = any
#: x86 CPU with AVX2 (Haswell's instruction set: also every AMD Zen), ``'vnni'`` = with
#: AVX-512 VNNI (Cascade Lake's), ``'host'`` = the build machine.
TARGET_CPU_MCPU = {'host': None, 'avx2': 'haswell', 'vnni': 'cascadelake'}


def deploy_target(mcpu: str | None = None, target_cpu: str = 'host') -> Any:
    """The target of a deployment: ``mcpu`` (an LLVM CPU name, the deploy config's
    ``backend_config.mcpu``) when given, else the CPU class ``target_cpu``
    (:data:`TARGET_CPU_MCPU`); both given and different is an error."""
    if target_cpu not in TARGET_CPU_MCPU:
        raise ValueError(f'target_cpu={target_cpu!r}; allowed: '
                         f'{", ".join(map(repr, TARGET_CPU_MCPU))}')
    if mcpu is not None and target_cpu != 'host':
        raise ValueError(f'backend_config.mcpu={mcpu!r} and target_cpu={target_cpu!r} both '
                         'name the target CPU; give one')
    return host_target(mcpu if mcpu is not None else TARGET_CPU_MCPU[target_cpu])


def _dtype(expr: Any) -> str:
    return str(expr.ty.dtype)


def _scalar_constant(expr: Any) -> int | None:
    """The value of a one-element integer Relax constant (a zero point), else None."""
    import tvm

    if not isinstance(expr, tvm.ir.expr.Constant):     # relax.const in TVM 0.27
        return None
    data = getattr(expr, 'value', None)
    if not hasattr(data, 'numpy'):
        return None
    value = data.numpy()
    return int(value.reshape(-1)[0]) if value.size == 1 else None


def _centred(bb: Any, w: Any, w_zp: Any) -> Any:
    """``w - w_zp`` in int16 (the zero point per output channel or a scalar; none: ``w``)."""
    from tvm import relax

    w = relax.op.astype(w, 'int16')
    if w_zp is None:
        return w
    zp = bb.normalize(relax.op.astype(w_zp, 'int16'))
    if len(zp.ty.shape) == 1:
        zp = relax.op.reshape(zp, (-1, 1, 1, 1))
    return relax.op.subtract(w, zp)


def _var_name(expr: Any) -> str | None:
    """Name of a Relax ``Var`` (``name`` in TVM 0.27, ``name_hint`` before)."""
    name = getattr(expr, 'name', None) or getattr(expr, 'name_hint', None)
    return str(name) if name is not None else None


def _max_abs(expr: Any, bounds: Mapping[str, int]) -> int | None:
    """``max |w|`` of a weight: a Relax constant's values, else ``bounds`` by its name
    (the build knows the values of the weights it passes as inputs), else None."""
    import tvm

    data = getattr(expr, 'value', None) if isinstance(expr, tvm.ir.expr.Constant) else None
    if data is not None and hasattr(data, 'numpy'):
        return int(np.abs(data.numpy().astype(np.int64)).max(initial=0))
    name = _var_name(expr)
    return bounds.get(name) if name is not None else None


def _kernel_for(kernel: str | None, w: Any, bounds: Mapping[str, int], wide: bool = False
                ) -> str | None:
    """The fast kernel a layer gets: ``kernel`` ('vnni' / 'avx2' / None), except that the
    AVX2 kernel takes only weights it computes exactly (``|w| <= 64``; the split 8-bit
    layer's halves always are)."""
    if kernel == 'avx2' and not wide and not weights_fit_avx2(_max_abs(w, bounds)):
        logger.info('weight %s: |w| may exceed 64 (int16 saturation of vpmaddubsw): '
                    'generic integer schedule', _var_name(w))
        return None
    return kernel


def _conv_integer_converter(float_exact: frozenset = frozenset(), kernel: str | None = None,
                            used: dict | None = None,
                            bounds: Mapping[str, int] | None = None) -> type:
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class ConvInteger(OnnxOpConverter):
        """ONNX ConvInteger → Relax ``nn.conv2d`` with an exact integer accumulator.

        Operands without zero points are used as they are (int8 x int8 for our 4-bit
        layers); with zero points both are widened to int16 and the zero points
        subtracted first (per channel for the weight). The accumulation is int32
        (``out_dtype='int32'``), or — for weights in ``float_exact``, layers whose every
        partial sum is an integer below 2^24 — float32 lanes holding the same integers
        exactly (AVX-512 FMA instead of the slow 32-bit integer multiply), cast to int32.
        With ``kernel`` ``'vnni'`` (``'avx2'``), int8 x int8 layers without zero points use
        the AVX-512 VNNI kernel of ``tvm/vnni.py`` (the AVX2 kernel of ``tvm/avx2.py``,
        for weights within ``|w| <= 64``) instead, and so do uint8 activations with a
        constant zero point (the 8-bit first layer: with uint8 weight codes on VNNI one
        kernel call with the codes as they are, ``vnni.emit_conv_vnni_u8_weights``, else
        the centred weight split into two int8 halves); exact int32; ``used`` maps their
        weight names to the kernel.
        """

        @classmethod
        def _impl_v10(cls, bb: Any, inputs: Sequence[Any], attr: dict, params: Any) -> Any:
            x, w = inputs[0], inputs[1]
            exact_fp32 = _var_name(w) in float_exact
            x_zp = inputs[2] if len(inputs) > 2 else None
            w_zp = inputs[3] if len(inputs) > 3 else None
            ndim = len(inputs[0].ty.shape)
            conv_args = (attr.get('strides', 1), attr.get('pads', 0), attr.get('dilations', 1),
                         int(attr.get('group', 1)))
            if kernel and ndim == 4:
                out, label = None, None
                z_x = _scalar_constant(x_zp)
                if vnni_applicable(_dtype(x), _dtype(w), x_zp is not None or w_zp is not None):
                    isa = _kernel_for(kernel, w, bounds or {})
                    if isa:
                        out = emit_conv_vnni(bb, x, w, *conv_args, isa=isa,
                                             fuse_epilogue=True,
                                             max_weight=_max_abs(w, bounds or {}))
                        label = isa
                elif _dtype(x) == 'uint8' and z_x is not None and _dtype(w) == 'int8' \
                        and w_zp is None:
                    # 8-bit activation codes, centred int8 weights (W4A8): the kernel takes
                    # them as they are (zero point folded into its per-channel shift)
                    isa = _kernel_for(kernel, w, bounds or {})
                    if isa:
                        out = emit_conv_vnni(bb, x, w, *conv_args, z_x, isa=isa,
                                             fuse_epilogue=True,
                                             max_weight=_max_abs(w, bounds or {}))
                        label = isa
                elif _dtype(x) == 'uint8' and z_x is not None and _dtype(w) == 'uint8' \
                        and kernel == 'vnni' and conv_args[3] == 1:
                    # the 8-bit first layer with uint8 weight codes: one VNNI call, the
                    # codes as they are (zero points subtracted after)
                    out = emit_conv_vnni_u8_weights(bb, x, w, w_zp, *conv_args[:3], z_x)
                    label = kernel
                elif _dtype(x) == 'uint8' and z_x is not None and _dtype(w) in ('uint8', 'int8'):
                    # the 8-bit first layer: uint8 codes with a zero point, 8-bit weights
                    out = emit_conv_vnni_wide(bb, x, bb.normalize(_centred(bb, w, w_zp)),
                                              *conv_args, z_x, isa=kernel)
                    label = f'{kernel}_split'
                if out is not None:
                    if used is not None:
                        used[_var_name(w)] = label
                    return out
            if x_zp is not None or w_zp is not None or _dtype(x) != _dtype(w):
                x = relax.op.astype(x, 'int16')
                if x_zp is not None:
                    x = relax.op.subtract(x, relax.op.astype(x_zp, 'int16'))
                w = _centred(bb, w, w_zp)
            if ndim != 4:
                raise NotImplementedError(f'ConvInteger on a {ndim}-d input')
            if exact_fp32:
                x = relax.op.astype(x, 'float32')
                w = relax.op.astype(w, 'float32')
            acc = relax.op.nn.conv2d(
                x, w, strides=attr.get('strides', 1), padding=attr.get('pads', 0),
                dilation=attr.get('dilations', 1), groups=attr.get('group', 1),
                data_layout='NCHW', kernel_layout='OIHW',
                out_dtype='float32' if exact_fp32 else 'int32')
            return relax.op.astype(acc, 'int32') if exact_fp32 else acc

    return ConvInteger


def _matmul_integer_converter(fallback: type, kernel: str | None = None,
                              used: dict | None = None,
                              bounds: Mapping[str, int] | None = None) -> type:
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class MatMulInteger(OnnxOpConverter):
        """ONNX MatMulInteger: 2-D int8 x int8 products without zero points (our Linear
        layers, e.g. the RoI box head) on the ``kernel`` ('vnni' / 'avx2', as ConvInteger);
        anything else through TVM's own converter (``fallback``)."""

        @classmethod
        def _impl_v10(cls, bb: Any, inputs: Sequence[Any], attr: dict, params: Any) -> Any:
            a, b = inputs[0], inputs[1]
            zero_points = any(len(inputs) > i and inputs[i] is not None for i in (2, 3))
            isa = _kernel_for(kernel, b, bounds or {}) if kernel else None
            if isa and len(a.ty.shape) == 2 and len(b.ty.shape) == 2 and \
                    vnni_applicable(_dtype(a), _dtype(b), zero_points):
                if used is not None:
                    used[_var_name(b)] = isa
                return emit_matmul_vnni(bb, a, b, isa=isa, max_weight=_max_abs(b, bounds or {}))
            return fallback._impl_v10(bb, inputs, attr, params)

    return MatMulInteger


@contextlib.contextmanager
def extra_onnx_converters(float_exact: Sequence[str] = (), kernel: str | None = None,
                          used: dict | None = None, bounds: Mapping[str, int] | None = None
                          ) -> Iterator[None]:
    """Add our converters (``ConvInteger``) to TVM's ONNX frontend, then restore it.

    Args:
        float_exact: weight input names whose layers accumulate exactly in float32 lanes.
        kernel: convert int8 x int8 layers to the AVX-512 VNNI kernel (``'vnni'``,
            ``tvm/vnni.py``) or the AVX2 kernel (``'avx2'``, ``tvm/avx2.py``); None: the
            generic schedule.
        used: receives weight name → kernel of the layers that got one.
        bounds: weight input name → ``max |w|`` (weights passed as inputs; the AVX2
            kernel takes only layers known to be within ``|w| <= 64``).
    """
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    extra = {'ConvInteger': _conv_integer_converter(frozenset(float_exact), kernel, used,
                                                    bounds)}

    def convert_map() -> dict:
        table = dict(original())
        for name, conv in extra.items():
            table.setdefault(name, conv)
        if 'MatMulInteger' in table:
            table['MatMulInteger'] = _matmul_integer_converter(table['MatMulInteger'], kernel,
                                                               used, bounds)
        return table

    onnx_frontend._get_convert_map = convert_map
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def _as_graph_inputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Move initializers ``names`` to graph inputs (runtime arguments of the compiled
    function, so their storage can be packed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(names)
    moved = {i.name: i for i in out.graph.initializer if i.name in wanted}
    missing = wanted - set(moved)
    if missing:
        raise KeyError(f'not initializers: {sorted(missing)}')
    kept = [i for i in out.graph.initializer if i.name not in wanted]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    for name in names:
        init = moved[name]
        out.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type,
                                                                  list(init.dims)))
    return out


def _int4_to_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """INT4/UINT4 initializers (left on layers that stay Q/DQ) as int8/uint8: TVM's ONNX
    frontend cannot read 4-bit tensors."""
    from onnx import TensorProto, numpy_helper

    widen = {TensorProto.INT4: np.int8, TensorProto.UINT4: np.uint8}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = [numpy_helper.from_array(numpy_helper.to_array(i).astype(widen[i.data_type]), i.name)
             if i.data_type in widen else i for i in out.graph.initializer]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out


def compile_onnx(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], *,
                 target: Any = None, schedule: bool = True,
                 float_exact: Sequence[str] = (), kernel: str = 'auto',
                 used: dict | None = None, bounds: Mapping[str, int] | None = None,
                 num_input: int | None = None, fast_sigmoid: bool = False) -> Any:
    """ONNX → Relax (our extra converters) → ``tvm.compile`` for ``target`` (host CPU).

    Args:
        model: the model; every graph input must be in ``input_shapes``.
        input_shapes: name → shape of every graph input.
        target: a TVM target (default :func:`host_target`).
        schedule: apply our fixed CPU schedules (``tvm/schedule.py``); False = TVM's default
            (unscheduled) lowering.
        float_exact: see :func:`extra_onnx_converters`.
        kernel: the int8 convolution kernel: ``'auto'`` (from the target: ``'vnni'`` with
            AVX-512 VNNI, else ``'avx2'`` with AVX2, else ``'generic'``), or one of those
            (``vnni.int8_kernel``); ``'generic'`` also without ``schedule``.
        used: receives weight name → kernel of the layers that got a fast kernel.
        bounds: weight input name → ``max |w|`` (see :func:`extra_onnx_converters`).
        num_input: with graph inputs beyond the first ``num_input`` (the weights), lift
            their layout changes into ``main_transform_params`` (Relax
            ``LiftTransformParams``), run once at load instead of per inference; ``main``
            then takes the data inputs and the transformed weights.
        fast_sigmoid: every sigmoid (SiLU) with ``fast_exp`` instead of ``expf``
            (``tvm/fast_sigmoid.py``: vectorized, not bit-identical).

    Returns:
        The Relax VM executable.
    """
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    dtypes = {}
    for inp in model.graph.input:
        elem = inp.type.tensor_type.elem_type
        dtypes[inp.name] = str(onnx.helper.tensor_dtype_to_np_dtype(elem))
    target = target if target is not None else host_target()
    chosen = int8_kernel(target, kernel) if schedule else 'generic'
    with extra_onnx_converters(float_exact, None if chosen == 'generic' else chosen, used,
                               bounds):
        mod = from_onnx(model, shape_dict={k: list(v) for k, v in input_shapes.items()},
                        dtype_dict=dtypes, keep_params_in_input=False)
    if num_input is not None and num_input < len(model.graph.input):
        from tvm import relax

        mod['main'] = mod['main'].with_attr('num_input', num_input)
        mod = relax.transform.LiftTransformParams()(mod)
    if fast_sigmoid:
        mod = fast_sigmoid_pass()(mod)
    start = time.perf_counter()
    pipeline = cpu_pipeline(target) if schedule else None
    executable = (tvm.compile(mod, target=target, relax_pipeline=pipeline) if pipeline
                  else tvm.compile(mod, target=target))
    logger.info('tvm.compile: %.1f s', time.perf_counter() - start)
    return executable


def build_artifact(model: onnx.ModelProto, work_dir: str | Path, *, integer: bool = True,
                   target: Any = None, schedule: bool = True, kernel: str = 'auto',
                   fast_sigmoid: bool = False) -> tuple[list[str], IntegerReport | None]:
    """Compile an exported model into a TVM artifact directory (module doc).

    Args:
        model: an ``export_onnx`` model (Q/DQ) or a float ONNX model.
        work_dir: directory for ``model.so`` / ``weights.npz`` / ``meta.json``.
        integer: rewrite quantized layers into integer ops and store their weights packed
            (False: compile the graph as it is, e.g. the FP32 reference).
        target: TVM target (default: host CPU; :func:`host_target` ``(mcpu)`` for another).
        schedule: apply our fixed CPU schedules (False: TVM's default lowering).
        kernel: the int8 convolution kernel (:func:`compile_onnx`; ``'auto'``: from the
            target).
        fast_sigmoid: sigmoids with ``fast_exp`` (:func:`compile_onnx`; ``meta.json``
            records it).

    Returns:
        ``([model.so, weights.npz, meta.json] paths, integer report or None)``.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    report = None
    packed: dict[str, PackedWeight] = {}
    if integer:
        model, report = to_integer_graph(model)
        packed = report.weights
    data_inputs = [i for i in model.graph.input
                   if i.name not in {t.name for t in model.graph.initializer}]
    input_shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in data_inputs}
    if any(d <= 0 for shape in input_shapes.values() for d in shape):
        raise ValueError(f'static input shapes are required, got {input_shapes}')
    weight_names = list(packed)
    compiled = _as_graph_inputs(_int4_to_int8(model), weight_names)
    shapes = dict(input_shapes)
    arrays: dict[str, np.ndarray] = {}
    weights_meta = []
    bounds: dict[str, int] = {}
    for i, name in enumerate(weight_names):
        pw = packed[name]
        value = pw.graph_value()
        shapes[name] = list(value.shape)
        bounds[name] = int(np.abs(value.astype(np.int64)).max(initial=0))
        bits = pw.bits
        arrays[f'w{i}.words'] = pack_int(_torch(pw.codes), bits, signed=pw.signed).numpy()
        arrays[f'w{i}.zero_point'] = pw.zero_point.astype(np.int32)
        weights_meta.append(dict(name=name, shape=list(pw.codes.shape), bits=bits,
                                 signed=pw.signed, qmin=pw.qmin, qmax=pw.qmax,
                                 centred=pw.centred, transpose=pw.transpose, kind=pw.kind,
                                 dtype=str(value.dtype)))
    target = target if target is not None else host_target()
    float_exact = [k for k, v in (report.accumulate if report else {}).items() if v == 'float32']
    used: dict[str, str] = {}
    lifted = bool(weight_names)
    executable = compile_onnx(compiled, shapes, target=target, schedule=schedule,
                              float_exact=float_exact, kernel=kernel, used=used,
                              bounds=bounds, num_input=len(input_shapes) if lifted else None,
                              fast_sigmoid=fast_sigmoid)
    so_path = work_dir / 'model.so'
    executable.export_library(str(so_path))
    np.savez(work_dir / 'weights.npz', **arrays)
    meta = dict(inputs={k: list(v) for k, v in input_shapes.items()},
                outputs=[o.name for o in model.graph.output], weights=weights_meta,
                target=str(target), integer=integer, scheduled=schedule,
                int8_kernel=int8_kernel(target, kernel) if schedule else 'generic',
                transform_params=lifted, fast_sigmoid=fast_sigmoid,
                accumulate=None if report is None else report.accumulate,
                kernels=None if report is None else {
                    k: _KERNEL_LABELS[used[k]] if k in used else f'{v}_accumulate'
                    for k, v in report.accumulate.items()},
                avx2_weight_limits={k: _avx2_limit(shapes[k], bounds.get(k))
                                    for k, v in used.items() if v == 'avx2'},
                layers=None if report is None else {k: list(v) for k, v in report.layers.items()})
    (work_dir / 'meta.json').write_text(json.dumps(meta, indent=1))
    return [str(work_dir / f) for f in ARTIFACT_FILES], report


def _avx2_limit(shape: Sequence[int], max_abs_weight: int | None) -> int:
    """The ``max |w|`` an AVX2 layer's kernel is exact for: a conv weight ``[K, C/g, kh,
    kw]`` (each group's kernel sees ``C/g`` channels) or a matrix ``[K, N]`` (a 1x1 conv
    over ``K`` channels), with the int16 sums :func:`avx2.int16_group` gave it."""
    c, kh, kw = (shape[1], shape[2], shape[3]) if len(shape) == 4 else (shape[0], 1, 1)
    return avx2_weight_limit(int16_group(c, kh, kw, max_abs_weight))


#: ``meta.json`` ``kernels`` label of a layer on a fast kernel (``_split``: the 8-bit first
#: layer, its weights split into two int8 halves)
_KERNEL_LABELS = {'vnni': 'vnni_int8', 'vnni_split': 'vnni_int8', 'avx2': 'avx2_int8',
                  'avx2_split': 'avx2_int8_split'}


def _torch(array: np.ndarray) -> Any:
    import torch
    return torch.from_numpy(np.ascontiguousarray(array.astype(np.int64)))
