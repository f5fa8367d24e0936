"""ONNX Runtime INT8: turn our Q/DQ export into the graph ORT runs with integer kernels.

ORT's CPU provider runs a quantized convolution with its integer kernels (QLinearConv,
VNNI) only for the node unit ``DequantizeLinear → Conv → QuantizeLinear``: the *output*
must be quantized too. Our fake-quant model quantizes layer *inputs* only (residual adds
and the heads' float outputs stay FP), so the raw export runs as float convolutions on
dequantized weights: slower than FP32 (measured in BUILD_NOTES / ``benchmarks/deploy.py``).
:func:`make_ort_int8` keeps every Q/DQ of our model and adds only what ORT needs:

1. weights are stored as ``int8`` with zero point 0 when their codes, re-centred
   (``q - z``), fit (every grid of <= 7 bits; ``s * ((q - z) - 0)`` is the same value);
   INT4 initializers become ``int8`` (ORT has no 4-bit convolution). On an x86 CPU
   without VNNI, ORT's u8 x s8 kernel adds pairs of products in int16 (``vpmaddubsw``)
   and saturates once ``|q - z| > 64`` (255 * 65 * 2 > 32767; measured: 12.75 off on
   such a conv). For such a target (``target_cpu='avx2'``, or ``'host'`` on such a CPU:
   :func:`u8s8_saturates`) wider weights are stored as ``uint8`` with zero point 128
   instead, which ORT's u8 x u8 kernel computes exactly but slower; weights of <= 7 bits
   and 8-bit grids quantized with ``QuantPolicy.w_reduce_range`` (``-64..64``) fit and
   stay int8 (the fast u8 x s8 kernel);
2. a quantized Conv/Gemm whose output goes (through at most a Relu) only into our next
   layer's input quantizers already ends in a QuantizeLinear: nothing is added (equal
   QuantizeLinear nodes on one tensor are merged into one, as ORT fuses only a single
   consumer), and the result is exactly ours;
3. any other quantized Conv/Gemm output (residual branches, FPN laterals, outputs feeding
   a float layer) gets an 8-bit ``uint8`` Q/DQ, its range measured by running OUR exported
   model on calibration inputs (min/max, ``qparams_from_range`` as our quantizers). This
   requantization is the one numerical change against the fake-quant model: at most half
   an 8-bit step of that tensor's range, which :func:`ort_int8_report` measures;
4. residual and FPN top-down adds become ``DQ, DQ -> Add -> Q`` so ORT runs them as
   ``QLinearAdd`` (:func:`integer_adds`): a float input that one of our 8-bit quantizers
   already reads takes that quantizer's value (at most half its step away), a nearest
   ``Resize`` of a dequantized tensor is requantized with the same parameters (exact), and
   the add's output goes straight into our next quantizer (a ReLU in between is dropped
   when that quantizer's ``uint8`` zero point 0 clamps negatives anyway: exact);
5. each float SiLU ``Sigmoid(x) → Mul(x, σ)`` becomes one ``com.microsoft.QuickGelu``
   (``alpha = 1``, the same function; :func:`~mmdet_regptq.deploy.onnx.silu.fuse_silu`),
   which ORT fuses itself on float graphs but not between Q/DQ nodes;
6. a float-weight layer (``fp_layers``) that reads a dequantized tensor reads it through
   its own per-axis ``DequantizeLinear`` (same values), so that ORT does not quantize its
   weight to int8 (:mod:`~mmdet_regptq.deploy.onnx.float_layers`);
7. a float ``Concat`` that only our next quantizer reads joins its inputs' 8-bit codes
   instead (each input quantized with that quantizer's parameters, above SPPF's
   ``MaxPool`` and nearest ``Resize``: exact; :mod:`~mmdet_regptq.deploy.onnx.concat`);
8. a quantized stride-2 image stem (at most 4 input channels) becomes a stride-1 conv on
   ``SpaceToDepth(2)`` of its zero-point-padded codes (the same sums, faster in ORT:
   :mod:`~mmdet_regptq.deploy.onnx.stem`).
"""
from __future__ import annotations

import itertools
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mmdet_regptq.deploy.onnx.concat import integer_concats
from mmdet_regptq.deploy.onnx.float_layers import per_axis_inputs_for_float_layers
from mmdet_regptq.deploy.onnx.graph import GraphIndex, attrs
from mmdet_regptq.deploy.onnx.silu import fuse_silu
from mmdet_regptq.deploy.onnx.stem import space_to_depth_stems
from mmdet_regptq.quant import QuantGrid, qparams_from_range

__all__ = ['OrtInt8Report', 'make_ort_int8', 'recentre_weights', 'conv_output_ranges',
           'merge_duplicate_quantizers', 'integer_adds', 'u8s8_saturates', 'SAFE_U8S8',
           'TARGET_CPUS', 'target_saturates', 'saturating_weights']

logger = logging.getLogger(__name__)

_QUANT_OPS = ('Conv', 'Gemm', 'MatMul')

#: largest ``|q - z|`` of an int8 weight that ORT's int16 pair sums hold for any uint8 input
SAFE_U8S8 = 64

#: ``make_ort_int8(target_cpu=...)``: ``'host'`` (this CPU), ``'avx2'`` (any x86 CPU,
#: also those without VNNI: int16 pair sums), ``'vnni'`` (x86 with AVX-512 VNNI / AVX-VNNI,
#: or ARM: int32 sums only)
TARGET_CPUS = ('host', 'avx2', 'vnni')


def u8s8_saturates(cpuinfo: str = '/proc/cpuinfo') -> bool:
    """Whether ORT's u8 x s8 convolution can saturate on this CPU: x86 without VNNI
    (AVX2 / AVX-512F sum pairs of u8 * s8 products in int16). Unknown x86 flags count as
    saturating (the safe choice); ARM and others sum in int32. A process whose CPUID hides
    the kernel's ``avx512_vnni`` (an emulator such as ``qemu-x86_64 -cpu Haswell``, or
    :mod:`~mmdet_regptq.deploy.onnx.avx2_shim`) gets ORT's AVX2 kernels: saturating too."""
    if platform.machine().lower() not in ('x86_64', 'amd64', 'i386', 'i686'):
        return False
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return True
    flags = set(next((line.split(':', 1)[1].split() for line in text.splitlines()
                      if line.startswith('flags')), []))
    if 'avx_vnni' in flags:
        return False
    return 'avx512_vnni' not in flags or _cpuid_avx512_vnni() is False


def _cpuid_avx512_vnni() -> bool | None:
    """AVX-512 VNNI as this process's CPUID reports it (numpy's dispatcher reads CPUID as
    ORT's does); ``None`` when numpy does not say."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        return None
    return __cpu_features__.get('AVX512VNNI')


def target_saturates(target_cpu: str) -> bool:
    """Whether ORT's u8 x s8 kernel can saturate on ``target_cpu`` (a :data:`TARGET_CPUS`
    entry; ``'host'`` reads this CPU's flags)."""
    if target_cpu not in TARGET_CPUS:
        raise ValueError(f'target_cpu={target_cpu!r} is unknown; allowed: {list(TARGET_CPUS)}')
    if target_cpu == 'host':
        return u8s8_saturates()
    return target_cpu == 'avx2'


def saturating_weights(model: onnx.ModelProto) -> list[str]:
    """``int8`` weights (read by a DequantizeLinear) with ``|q - z| > SAFE_U8S8``: exact
    with VNNI, but saturating in ORT's u8 x s8 kernel on an x86 CPU without it."""
    index = GraphIndex(model)
    found = []
    for node in model.graph.node:
        if node.op_type != 'DequantizeLinear' or node.input[0] not in index.inits:
            continue
        codes = index.const(node.input[0])
        if codes.dtype != np.int8 or node.input[0] in found:
            continue
        zp = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        centred = codes.astype(np.int64)
        if zp is not None and zp.ndim == 1:
            shape = [1] * codes.ndim
            shape[attrs(node).get('axis', 1)] = -1
            centred = centred - zp.astype(np.int64).reshape(shape)
        elif zp is not None:
            centred = centred - zp.astype(np.int64)
        if np.abs(centred).max(initial=0) > SAFE_U8S8:
            found.append(node.input[0])
    return found


@dataclass
class OrtInt8Report:
    """What :func:`make_ort_int8` changed.

    Attributes:
        fused: quantized layers whose output already ends in our own QuantizeLinear.
        requantized: layer output → ``(scale, zero_point)`` of the added 8-bit Q/DQ.
        recentred: weights stored as int8 with zero point 0.
        merged: QuantizeLinear nodes removed as duplicates of another on the same tensor.
        integer_adds: Add nodes now between DequantizeLinear inputs and one QuantizeLinear
            (ORT runs them as ``QLinearAdd``).
        widened: weights that would fit int8 but stay uint8 with a zero point, because
            ORT's u8 x s8 kernel would saturate on them on the target CPU.
        silu_fused: ``Sigmoid → Mul`` pairs (SiLU) replaced by one ``QuickGelu``.
        float_kept: float-weight layers given a per-axis dequantized input so that ORT
            keeps their weights float.
        integer_concats: Concat nodes that now join 8-bit codes instead of floats.
        stems: stride-2 stems now computed as stride-1 convs on ``SpaceToDepth`` codes.
        target_cpu: the ``target_cpu`` the layout was chosen for (``'host'`` resolved to
            ``'avx2'`` / ``'vnni'``).
    """

    fused: list[str] = field(default_factory=list)
    requantized: dict[str, tuple[float, int]] = field(default_factory=dict)
    recentred: list[str] = field(default_factory=list)
    merged: int = 0
    integer_adds: list[str] = field(default_factory=list)
    widened: list[str] = field(default_factory=list)
    silu_fused: int = 0
    float_kept: list[str] = field(default_factory=list)
    integer_concats: list[str] = field(default_factory=list)
    stems: list[str] = field(default_factory=list)
    target_cpu: str = ''

    def summary(self) -> str:
        return (f'{len(self.fused)} layers end in our own Q, {len(self.requantized)} outputs '
                f'requantized to uint8, {len(self.recentred)} weights re-centred to int8, '
                f'{self.merged} duplicate QuantizeLinear merged, '
                f'{len(self.integer_adds)} adds in integers, '
                f'{self.silu_fused} SiLU as QuickGelu'
                + (f', {len(self.integer_concats)} concats in 8 bits'
                   if self.integer_concats else '')
                + (f', {len(self.stems)} stems on SpaceToDepth' if self.stems else '')
                + (f', {len(self.float_kept)} float layers on a per-axis dequantized input'
                   if self.float_kept else '')
                + (f' (target CPU {self.target_cpu})' if self.target_cpu else '')
                + (f', {len(self.widened)} weights kept uint8 (no VNNI: u8 x s8 would '
                   'saturate)' if self.widened else ''))

    def hint(self) -> str:
        """One line for a target without VNNI whose 8-bit weights stayed uint8."""
        if not self.widened:
            return ''
        return (f'{len(self.widened)} weights of more than 7 bits stay uint8 for the '
                f'{self.target_cpu or "avx2"} target (ORT\'s slower u8 x u8 kernel; u8 x s8 '
                'would saturate): quantize with quant=dict(..., w_reduce_range=True) to '
                'store them int8')


def _quantized_layers(index: GraphIndex) -> list[onnx.NodeProto]:
    """Conv/Gemm/MatMul nodes with a DequantizeLinear on both the input and the weight."""
    found = []
    for node in index.model.graph.node:
        if node.op_type not in _QUANT_OPS or len(node.input) < 2:
            continue
        x_dq = index.producer_of(node.input[0], 'DequantizeLinear')
        w_dq = index.producer_of(node.input[1], 'DequantizeLinear')
        if x_dq is not None and w_dq is not None and w_dq.input[0] in index.inits:
            found.append(node)
    return found


def recentre_weights(model: onnx.ModelProto, report: OrtInt8Report | None = None, *,
                     int8_limit: int = 127) -> None:
    """Store every DQ'd integer weight as ``int8`` with zero point 0 where ``q - z`` fits
    in ``-int8_limit - 1 .. int8_limit`` (``SAFE_U8S8`` where u8 x s8 saturates: then
    ``-64 .. 64``), else as ``uint8`` with its zero point (``q - z + 128`` / 128 when the
    codes are signed), else 8-bit as they are (INT4 → 8-bit carrier). Values are
    unchanged."""
    report = report if report is not None else OrtInt8Report()
    index = GraphIndex(model)
    replaced: dict[str, onnx.TensorProto] = {}
    for node in model.graph.node:
        if node.op_type != 'DequantizeLinear' or node.input[0] not in index.inits \
                or node.input[0] in replaced:     # a shared head's weight: one DQ per level
            continue
        codes = index.const(node.input[0]).astype(np.int64)
        zp_name = node.input[2] if len(node.input) > 2 else ''
        zp = index.const(zp_name).astype(np.int64) if zp_name else np.zeros(())
        axis = attrs(node).get('axis', 1)
        if zp.ndim == 1:
            shape = [1] * codes.ndim
            shape[axis] = -1
            centred = codes - zp.reshape(shape)
        else:
            centred = codes - zp
        fits_int8 = centred.min() >= -128 and centred.max() <= 127
        low = -128 if int8_limit >= 127 else -int8_limit
        if fits_int8 and centred.min() >= low and centred.max() <= int8_limit:
            new_codes, new_zp = centred.astype(np.int8), np.zeros(zp.shape, np.int8)
            report.recentred.append(node.input[0])
        elif codes.min() >= 0 and codes.max() <= 255 and zp.min() >= 0 and zp.max() <= 255:
            new_codes, new_zp = codes.astype(np.uint8), zp.astype(np.uint8)
            if fits_int8:                   # kept uint8 because of ``int8_limit``
                report.widened.append(node.input[0])
        elif fits_int8:
            new_codes = (centred + 128).astype(np.uint8)
            new_zp = np.full(zp.shape, 128, np.uint8)
            report.widened.append(node.input[0])
        else:
            new_codes, new_zp = codes.astype(np.int8), zp.astype(np.int8)
        replaced[node.input[0]] = numpy_helper.from_array(new_codes, node.input[0])
        if zp_name:
            replaced[zp_name] = numpy_helper.from_array(new_zp, zp_name)
    inits = [replaced.get(i.name, i) for i in model.graph.initializer]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


def _ends_in_quantizer(index: GraphIndex, name: str) -> bool:
    """Whether tensor ``name`` feeds (via at most one Relu) only per-tensor uint8/int8 Q nodes
    that share one scale / zero point (and zero point == qmin of uint8 after a Relu)."""
    if name in index.graph_outputs:
        return False
    users = index.users(name)
    relu = False
    if len(users) == 1 and users[0].op_type == 'Relu':
        relu = True
        if users[0].output[0] in index.graph_outputs:
            return False
        users = index.users(users[0].output[0])
    if not users or any(u.op_type != 'QuantizeLinear' for u in users):
        return False
    params = set()
    for q in users:
        scale, zp = index.const(q.input[1]), index.const(q.input[2])
        if scale is None or zp is None or scale.size != 1:
            return False
        if relu and not _clamps_negatives(index, q):
            return False
        params.add((float(scale), int(zp), zp.dtype.str))
    return len(params) == 1


def merge_duplicate_quantizers(model: onnx.ModelProto) -> int:
    """Merge the QuantizeLinear nodes that read the same tensor with equal parameters.

    An FPN output feeds both head towers; their input quantizers see the same tensor, so
    calibration gives them equal scales, but the export has one Q per tower. ORT fuses
    ``DQ -> Conv -> Q`` into ``QLinearConv`` only when the Conv has ONE consumer, so two
    equal Qs kept the FPN convs in float. The duplicates' consumers now read the first Q
    (same values). Returns the number of removed nodes.
    """
    index = GraphIndex(model)
    replace: dict[str, str] = {}
    drop: set[int] = set()
    for tensor in {i for n in model.graph.node for i in n.input[:1]}:
        kept: dict[tuple, str] = {}
        for q in index.users(tensor):
            if q.op_type != 'QuantizeLinear' or q.input[0] != tensor or \
                    q.output[0] in index.graph_outputs:
                continue
            params = tuple(_const_key(index, name) for name in q.input[1:]) + (
                tuple(sorted((k, str(v)) for k, v in attrs(q).items())),)
            if None in params:
                continue
            if params in kept:
                replace[q.output[0]] = kept[params]
                drop.add(id(q))
            else:
                kept[params] = q.output[0]
    if not drop:
        return 0
    nodes = [n for n in model.graph.node if id(n) not in drop]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(drop)


def _const_key(index: GraphIndex, name: str) -> tuple | None:
    value = index.const(name)
    return None if value is None else (value.dtype.str, value.shape, value.tobytes())


def conv_output_ranges(model: onnx.ModelProto, names: Iterable[str],
                       inputs: Iterable[Mapping[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """Min/max of the tensors ``names`` over ``inputs``, by running ``model`` in ORT."""
    import onnxruntime as ort

    names = list(names)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                    None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), options,
                                providers=['CPUExecutionProvider'])
    ranges: dict[str, tuple[float, float]] = {}
    for feed in inputs:
        outs = sess.run(names, dict(feed))
        for name, value in zip(names, outs):
            lo, hi = float(value.min()), float(value.max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))
    if not ranges and names:
        raise ValueError('conv_output_ranges: no calibration input given')
    return ranges


def _full_8bit_quantizer(index: GraphIndex, q: onnx.NodeProto) -> bool:
    """A per-tensor 8-bit QuantizeLinear read only by DequantizeLinear (no narrowing Clip:
    a 4-bit activation grid is ``Q -> Clip -> DQ``, too coarse to stand in for a float)."""
    if q.op_type != 'QuantizeLinear' or len(q.input) < 3 or q.output[0] in index.graph_outputs:
        return False
    scale, zp = index.const(q.input[1]), index.const(q.input[2])
    if scale is None or zp is None or scale.size != 1 or zp.dtype not in (np.uint8, np.int8):
        return False
    return all(u.op_type == 'DequantizeLinear' for u in index.users(q.output[0]))


def _clamps_negatives(index: GraphIndex, q: onnx.NodeProto) -> bool:
    """A ``uint8`` quantizer with zero point 0: it maps negatives to 0 as a ReLU would."""
    zp = index.const(q.input[2]) if len(q.input) > 2 else None
    return zp is not None and zp.dtype == np.uint8 and zp.size == 1 and int(zp) == 0


def _topological(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` reordered so every input is produced before it is read (stable)."""
    ready = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    ready.add('')
    order: list[onnx.NodeProto] = []
    pending = list(nodes)
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError('ORT INT8: the rewritten graph has a cycle')
        pending = rest
    return order


def integer_adds(model: onnx.ModelProto) -> list[str]:
    """Rewrite residual / FPN adds into ``DQ, DQ -> Add -> Q`` (module doc, step 4).

    Three passes over the adds of two non-constant inputs:
      1. a float input that an 8-bit quantizer of ours also reads is replaced by that
         quantizer's dequantized value;
      2. the output: through a ReLU whose readers are all ``uint8``/zero-point-0
         quantizers, those quantizers read the add directly (exact); otherwise, when one of
         its readers is an 8-bit quantizer, the other readers (a Resize, a Shape) read that
         quantizer's dequantized value;
      3. a float input produced by a nearest ``Resize`` of a dequantized tensor gets a Q/DQ
         with that tensor's parameters (exact: nearest resizing copies values).
    Returns the adds whose inputs are all dequantized and whose output feeds one Q.
    """
    rewriter = _AddRewriter(model)
    rewriter.share_quantized_inputs()
    rewriter.quantize_outputs()
    rewriter.requantize_resized_inputs()
    rewriter.rebuild()
    index = GraphIndex(model)
    done = []
    for add in rewriter.adds:
        users = index.users(add.output[0])
        if all(index.producer_of(i, 'DequantizeLinear') is not None for i in add.input) and \
                len(users) == 1 and users[0].op_type == 'QuantizeLinear':
            done.append(add.name or add.output[0])
    return done


class _AddRewriter:
    """The passes of :func:`integer_adds`; new nodes are collected and inserted once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.index = GraphIndex(model)
        self.added: dict[str, list[onnx.NodeProto]] = {}     # tensor -> new nodes reading it
        self.new_dq: dict[str, str] = {}
        self.dropped: set[int] = set()
        self.counter = itertools.count()
        self.adds = [n for n in model.graph.node if n.op_type == 'Add' and len(n.input) == 2
                     and all(self.index.const(i) is None for i in n.input)]

    def dequantized(self, q: onnx.NodeProto) -> str:
        """An existing or new DequantizeLinear of ``q``'s output (same parameters)."""
        for user in self.index.users(q.output[0]):
            if user.op_type == 'DequantizeLinear' and list(user.input[1:]) == list(q.input[1:]):
                return user.output[0]
        if q.output[0] not in self.new_dq:
            out = self.new_dq[q.output[0]] = f'{q.output[0]}.dq{next(self.counter)}'
            self.added.setdefault(q.output[0], []).append(helper.make_node(
                'DequantizeLinear', [q.output[0], *q.input[1:]], [out],
                name=f'{out}/DequantizeLinear'))
        return self.new_dq[q.output[0]]

    def is_float(self, name: str) -> bool:
        return self.index.const(name) is None and \
            self.index.producer_of(name, 'DequantizeLinear') is None

    def share_quantized_inputs(self) -> None:
        """Pass 1."""
        for add in self.adds:
            for i, name in enumerate(add.input):
                quantizers = [u for u in self.index.users(name)
                              if _full_8bit_quantizer(self.index, u)]
                if self.is_float(name) and quantizers:
                    add.input[i] = self.dequantized(quantizers[0])
        self.index = GraphIndex(self.model)

    def quantize_outputs(self) -> None:
        """Pass 2."""
        index = self.index
        for add in self.adds:
            out = add.output[0]
            users = index.users(out)
            if out in index.graph_outputs or not users:
                continue
            if len(users) == 1 and users[0].op_type == 'Relu' and \
                    users[0].output[0] not in index.graph_outputs:
                relu_users = index.users(users[0].output[0])
                if relu_users and all(u.op_type == 'QuantizeLinear' and
                                      _clamps_negatives(index, u) for u in relu_users):
                    for q in relu_users:
                        q.input[0] = out
                    self.dropped.add(id(users[0]))
                continue
            quantizers = [u for u in users if _full_8bit_quantizer(index, u)]
            if not quantizers:
                continue
            for user in users:
                if user.op_type == 'QuantizeLinear':
                    continue
                for j, name in enumerate(user.input):
                    if name == out:
                        user.input[j] = self.dequantized(quantizers[0])
        self.index = GraphIndex(self.model)

    def requantize_resized_inputs(self) -> None:
        """Pass 3."""
        index = self.index
        for add in self.adds:
            for i, name in enumerate(add.input):
                resize = index.producer_of(name, 'Resize')
                if not self.is_float(name) or resize is None or \
                        attrs(resize).get('mode', b'nearest') not in (b'nearest', 'nearest'):
                    continue
                source = index.producer_of(resize.input[0], 'DequantizeLinear')
                if source is None or len(source.input) < 3:
                    continue
                prefix = f'{name}.requant{next(self.counter)}'
                self.added.setdefault(name, []).extend([
                    helper.make_node('QuantizeLinear', [name, *source.input[1:]],
                                     [f'{prefix}.int'], name=f'{prefix}/QuantizeLinear'),
                    helper.make_node('DequantizeLinear', [f'{prefix}.int', *source.input[1:]],
                                     [prefix], name=f'{prefix}/DequantizeLinear')])
                add.input[i] = prefix

    def rebuild(self) -> None:
        """One rebuild at the end: ``extend()`` copies, the edits need the originals."""
        graph = self.model.graph
        nodes = []
        for node in graph.node:
            if id(node) in self.dropped:
                continue
            nodes.append(node)
            for out in node.output:
                nodes.extend(self.added.get(out, []))
        del graph.node[:]
        graph.node.extend(_topological(self.model, nodes))


def make_ort_int8(model: onnx.ModelProto, calib_inputs: Iterable[Mapping[str, np.ndarray]],
                  *, target_cpu: str = 'host') -> tuple[onnx.ModelProto, OrtInt8Report]:
    """Rewrite an exported Q/DQ model for ONNX Runtime's integer kernels (module doc).

    Args:
        model: output of ``export_onnx`` (any weight carrier); not modified.
        calib_inputs: feeds ``{input_name: array}`` to measure the added output ranges
            (images preprocessed as the model expects; a handful is enough).
        target_cpu: where the model will run (:data:`TARGET_CPUS`): ``'avx2'`` keeps
            weights with ``|q - z| > 64`` in ``uint8`` (exact on every CPU, slower u8 x u8
            kernel; with ``QuantPolicy.w_reduce_range`` no 8-bit weight needs it);
            ``'vnni'`` stores every int8-able weight as int8 (wrong on a CPU without
            VNNI when a weight exceeds 64); ``'host'``: whichever this CPU needs
            (:func:`u8s8_saturates`). Choose ``'avx2'`` when the build machine is not the
            run machine and the run machine may lack VNNI.

    Returns:
        ``(new model, report)``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    saturates = target_saturates(target_cpu)
    report = OrtInt8Report(target_cpu='avx2' if saturates else 'vnni')
    recentre_weights(out, report, int8_limit=SAFE_U8S8 if saturates else 127)
    if report.widened:
        logger.warning('ORT INT8: %s', report.hint())
    report.merged = merge_duplicate_quantizers(out)
    index = GraphIndex(out)
    todo = []
    for node in _quantized_layers(index):
        if _ends_in_quantizer(index, node.output[0]):
            report.fused.append(node.name or node.output[0])
        else:
            todo.append(node)
    ranges = conv_output_ranges(out, [n.output[0] for n in todo], calib_inputs) if todo else {}
    grid = QuantGrid(0, 255, False)
    new_inits = []
    renames: dict[str, str] = {}
    extra_nodes: dict[str, list[onnx.NodeProto]] = {}
    for node in todo:
        name = node.output[0]
        lo, hi = ranges[name]
        scale, zp = qparams_from_range(torch.tensor([min(lo, 0.0)]),
                                       torch.tensor([max(hi, 0.0)]), grid)
        s, z = float(scale[0]), int(zp[0])
        raw = f'{name}.fp'
        prefix = f'{name}.requant'
        renames[name] = raw
        new_inits += [numpy_helper.from_array(np.array(s, np.float32), f'{prefix}.scale'),
                      numpy_helper.from_array(np.array(z, np.uint8), f'{prefix}.zero_point')]
        extra_nodes[name] = [
            helper.make_node('QuantizeLinear', [raw, f'{prefix}.scale', f'{prefix}.zero_point'],
                             [f'{prefix}.int'], name=f'{prefix}/QuantizeLinear'),
            helper.make_node('DequantizeLinear', [f'{prefix}.int', f'{prefix}.scale',
                                                  f'{prefix}.zero_point'], [name],
                             name=f'{prefix}/DequantizeLinear')]
        report.requantized[name] = (s, z)
    nodes = []
    for node in out.graph.node:
        orig = node.output[0] if node.output else None
        nodes.append(node)
        if orig in renames:
            node.output[0] = renames[orig]
            nodes.extend(extra_nodes[orig])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(new_inits)
    report.integer_adds = integer_adds(out)
    report.integer_concats = integer_concats(out)
    report.silu_fused = fuse_silu(out)
    report.float_kept = per_axis_inputs_for_float_layers(out)
    report.stems = space_to_depth_stems(out)
    onnx.checker.check_model(out, full_check=True)
    logger.info('ORT INT8: %s', report.summary())
    return out, report

