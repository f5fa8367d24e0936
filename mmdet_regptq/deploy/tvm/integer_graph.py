"""Rewrite the Q/DQ export so quantized Conv/Gemm layers compute in integers.

For every ``Conv`` / ``Gemm`` whose input and weight both come from a DequantizeLinear
(weight: an integer initializer, per output channel), the float layer

    y = conv(DQ(a; s_x, z_x), DQ(W; s_w, z_w)) + b

is replaced by standard ONNX integer ops

    acc = ConvInteger(a - z_x, W - z_w)                     (int32 accumulation)
    y   = Cast(acc, float) * (s_x * s_w[c]) + b             (one float rescale per output)

which is the same value up to float rounding of the rescale (the products and their sum are
exact integers here, whereas the fake-quant model sums float products). Operand types:

- activations: a grid whose re-centred codes ``a - z_x`` fit int8 (every grid of <= 7
  bits, e.g. the 4-bit ``0..15``) is re-centred in the graph (``Cast`` to int8, ``Sub``) and
  fed as **int8**; an 8-bit ``uint8`` grid (the 8-bit first layer) is fed as uint8 with
  ``x_zero_point``;
- weights: re-centred offline to **int8** ``W - z_w`` where it fits (every weight grid of
  <= 7 bits); otherwise (8-bit asymmetric weights) the codes with a per-channel
  ``w_zero_point``.

So a W4A4 layer runs as int8 x int8 -> int32 (:data:`IntegerReport.layers` says, per
layer, which operand types were used). ``Gemm`` (``nn.Linear``) becomes ``MatMulInteger``
with the weight transposed offline. An LLAQ conv in shift form (``export``:
``(DQ(pos) + DQ(neg)) + mu``) becomes one int8 ``ConvInteger`` with outputs
``[pos; neg; ones]`` (:meth:`_Rewriter.rewrite_shift`). The backend converter maps
``ConvInteger`` to a Relax ``conv2d`` with ``out_dtype='int32'``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mmdet_regptq.deploy.onnx.graph import GraphIndex, attrs
from mmdet_regptq.deploy.tvm.packed import PackedWeight, shift_weight_value

__all__ = ['IntegerReport', 'PackedWeight', 'to_integer_graph', 'merge_duplicate_nodes']

logger = logging.getLogger(__name__)

_CARRIER_RANGE = {np.dtype('uint8'): (0, 255), np.dtype('int8'): (-128, 127)}
#: Integers up to 2^24 are exact in float32 (and so are their sums while they stay below).
FP32_EXACT = 1 << 24


def shift_codes(pos: np.ndarray, neg: np.ndarray) -> np.ndarray | None:
    """Signed shift codes of an LLAQ shift-form weight (``PackedWeight.kind == 'shift'``),
    or None when a value is not a power of two of its side's sign."""
    pos, neg = pos.astype(np.int64), neg.astype(np.int64)
    if np.any(pos < 0) or np.any(neg > 0) or np.any((pos != 0) & (neg != 0)):
        return None
    mag = pos - neg
    if np.any((mag & (mag - 1)) != 0):
        return None
    expo = np.where(mag > 0, np.log2(np.maximum(mag, 1)).round().astype(np.int64) + 1, 0)
    return np.where(neg < 0, -expo, expo)


@dataclass
class IntegerReport:
    """Per rewritten layer (by its output tensor): ``(activation dtype, weight dtype)`` of
    the integer op; ``weights``: new initializer name → :class:`PackedWeight`;
    ``skipped``: float Conv/Gemm left as they were (FP layers) with the reason;
    ``accumulate``: weight name → ``'float32'`` when every partial sum of the layer is an
    integer below 2^24 in magnitude (``K * max|x| * max|w|``), so float32 lanes hold the
    int32 accumulator exactly, else ``'int32'``."""

    layers: dict[str, tuple[str, str]] = field(default_factory=dict)
    weights: dict[str, PackedWeight] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    accumulate: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for a, w in self.layers.values():
            kinds[f'{a}x{w}'] = kinds.get(f'{a}x{w}', 0) + 1
        fp32 = sum(v == 'float32' for v in self.accumulate.values())
        return (f'{len(self.layers)} integer layers {kinds} ({fp32} with exact float32 '
                f'accumulation), {len(self.skipped)} float Conv/Gemm kept')


def _act_grid(index: GraphIndex, name: str, zp_dtype: np.dtype) -> tuple[int, int]:
    """Integer range of activation codes ``name`` (Clip bounds, else the carrier range)."""
    clip = index.producer_of(name, 'Clip')
    if clip is not None and len(clip.input) == 3:
        lo, hi = index.const(clip.input[1]), index.const(clip.input[2])
        if lo is not None and hi is not None:
            return int(lo), int(hi)
    return _CARRIER_RANGE[np.dtype(zp_dtype)]


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, report: IntegerReport) -> None:
        self.model = model
        self.index = GraphIndex(model)
        self.report = report
        self.new_inits: list[onnx.TensorProto] = []
        self.replacements: dict[str, list[onnx.NodeProto]] = {}  # by the old node's output
        self.packed_names: dict[str, str] = {}

    def init(self, array: np.ndarray, name: str) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def add_bias(self, nodes: list[onnx.NodeProto], src: str, out: str,
                 bias: np.ndarray | None, prefix: str, spatial_dims: int) -> None:
        """``out = src + bias`` (per output channel, broadcast over ``spatial_dims``
        trailing axes); nothing when there is no bias (``src`` is then ``out``)."""
        if bias is None:
            return
        value = bias.astype(np.float32)
        if spatial_dims:
            value = value.reshape(-1, *([1] * spatial_dims))
        nodes.append(helper.make_node('Add', [src, self.init(value, f'{prefix}.bias')], [out],
                                      name=f'{prefix}/Bias'))

    def activation_operand(self, x_dq: onnx.NodeProto, zx: np.ndarray | None, prefix: str,
                           nodes: list[onnx.NodeProto]) -> tuple[str, str, str, int, int, int]:
        """``(codes tensor, zero-point input or '', kind, lo, hi, z_x)`` of a layer input:
        re-centred int8 where the grid allows (module doc), appending the nodes."""
        a = x_dq.input[0]
        a_dtype = np.dtype(zx.dtype) if zx is not None else np.dtype('uint8')
        zx_val = int(zx) if zx is not None else 0
        lo, hi = _act_grid(self.index, a, a_dtype)
        if a_dtype == np.dtype('int8') and zx_val == 0:
            return a, '', 'int8', lo, hi, zx_val
        if hi <= 127 and lo >= -128 and hi - zx_val <= 127 and lo - zx_val >= -128:
            cast = f'{prefix}.x_i8'
            nodes.append(helper.make_node('Cast', [a], [cast], to=TensorProto.INT8,
                                          name=f'{prefix}/CastX'))
            if not zx_val:
                return cast, '', 'int8', lo, hi, zx_val
            x_int = f'{prefix}.x_centred'
            zname = self.init(np.array(zx_val, np.int8), f'{prefix}.x_zp_i8')
            nodes.append(helper.make_node('Sub', [cast, zname], [x_int], name=f'{prefix}/CentreX'))
            return x_int, '', 'int8', lo, hi, zx_val
        return a, x_dq.input[2], str(a_dtype), lo, hi, zx_val

    def shift_weight(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                               np.ndarray, np.ndarray] | None:
        """``(pos, neg, s_+, s_-, mu)`` of an exported LLAQ shift-form weight
        ``Add(Add(DQ(pos), DQ(neg)), mu)`` (``export._lower_shift_weight``), else None."""
        idx = self.index
        centre = idx.producer_of(name, 'Add')
        sides = idx.producer_of(centre.input[0], 'Add') if centre is not None else None
        mu = idx.const(centre.input[1]) if centre is not None else None
        if sides is None or mu is None:
            return None
        found = []
        for side in sides.input:
            dq = idx.producer_of(side, 'DequantizeLinear')
            if dq is None or attrs(dq).get('axis', 1) != 0 or len(dq.input) < 3:
                return None
            codes, scale, zp = (idx.const(i) for i in dq.input[:3])
            if codes is None or scale is None or zp is None or np.any(zp != 0):
                return None
            found.append((codes, scale))
        (pos, s_pos), (neg, s_neg) = found
        rows = pos.shape[0]
        if neg.shape != pos.shape or mu.size != rows or s_pos.size != rows or s_neg.size != rows:
            return None
        return pos, neg, s_pos.reshape(-1), s_neg.reshape(-1), mu.reshape(-1)

    def rewrite_shift(self, node: onnx.NodeProto, shift: tuple, x_int: str, x_zp: str,
                      x_range: tuple[int, int], sx: float, bias: np.ndarray | None,
                      prefix: str, nodes: list[onnx.NodeProto]) -> str | None:
        """An LLAQ layer as ONE int8 ``ConvInteger`` with ``2 C_out + 1`` outputs
        ``[pos; neg; ones]``, then ``y = s_x (s_+ acc_pos + s_- acc_neg + mu acc_ones) + b``.

        ``acc_ones`` is the window sum of the centred input codes, so the centre ``mu``
        costs one output channel; the products are exact integers, as in :meth:`rewrite`.
        """
        pos, neg, s_pos, s_neg, mu = shift
        if node.op_type != 'Conv' or attrs(node).get('group', 1) != 1:
            return 'LLAQ shift form: only ungrouped Conv'
        if x_zp:
            return 'LLAQ shift form: input codes do not fit int8 after centring'
        codes = shift_codes(pos, neg)
        if codes is None:
            return 'LLAQ shift form: weights are not powers of two'
        rows, spatial = pos.shape[0], [1] * (pos.ndim - 2)
        value = shift_weight_value(codes)
        wname = self.init(value, f'rq_w{len(self.report.weights)}')
        max_x = max(abs(x_range[0]), abs(x_range[1]))
        reduce = int(np.prod(pos.shape[1:]))
        self.report.accumulate[wname] = _accumulator(reduce, max_x, 128)
        self.report.weights[wname] = PackedWeight(
            codes=codes, zero_point=np.zeros(rows, np.int64), qmin=int(min(codes.min(), -1)),
            qmax=int(max(codes.max(), 1)), kind='shift')
        acc, accf = f'{prefix}.acc', f'{prefix}.acc_f'
        scale = np.concatenate([sx * s_pos.astype(np.float32), sx * s_neg.astype(np.float32),
                                np.array([sx], np.float32)]).astype(np.float32)
        parts = [f'{prefix}.{p}' for p in ('pos', 'neg', 'ones')]
        split = self.init(np.array([rows, rows, 1], np.int64), f'{prefix}.split')
        nodes += [
            helper.make_node('ConvInteger', [x_int, wname], [acc], name=f'{prefix}/Conv',
                             **_conv_attrs(node)),
            helper.make_node('Cast', [acc], [accf], to=TensorProto.FLOAT, name=f'{prefix}/CastAcc'),
            helper.make_node('Mul', [accf, self.init(scale.reshape(-1, *spatial),
                                                     f'{prefix}.rescale')],
                             [f'{prefix}.scaled'], name=f'{prefix}/Rescale'),
            helper.make_node('Split', [f'{prefix}.scaled', split], parts, axis=1,
                             name=f'{prefix}/Split'),
            helper.make_node('Add', parts[:2], [f'{prefix}.sides'], name=f'{prefix}/AddSides'),
            helper.make_node('Mul', [parts[2], self.init(mu.astype(np.float32).reshape(
                -1, *spatial), f'{prefix}.mu')], [f'{prefix}.centre'], name=f'{prefix}/Centre')]
        out = node.output[0]
        last = out if bias is None else f'{prefix}.nobias'
        nodes.append(helper.make_node('Add', [f'{prefix}.sides', f'{prefix}.centre'], [last],
                                      name=f'{prefix}/AddCentre'))
        self.add_bias(nodes, last, out, bias, prefix, pos.ndim - 2)
        self.replacements[out] = nodes
        self.report.layers[out] = ('int8', 'int8 shift')
        return None

    def rewrite(self, node: onnx.NodeProto) -> str | None:
        """Integer form of one Conv/Gemm, or the reason it stays float."""
        idx = self.index
        x_dq = idx.producer_of(node.input[0], 'DequantizeLinear')
        w_dq = idx.producer_of(node.input[1], 'DequantizeLinear')
        shift = self.shift_weight(node.input[1]) if w_dq is None else None
        if x_dq is None or (w_dq is None and shift is None):
            return 'float input or weight'
        sx = idx.const(x_dq.input[1])
        zx = idx.const(x_dq.input[2]) if len(x_dq.input) > 2 and x_dq.input[2] else None
        if sx is None or sx.size != 1:
            return 'activation parameters are not constants / not per tensor'
        bias = idx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            return 'bias is not a constant'
        if node.op_type == 'Gemm':
            g = attrs(node)
            if g.get('transA', 0) or g.get('alpha', 1.0) != 1.0 or g.get('beta', 1.0) != 1.0:
                return 'Gemm with transA/alpha/beta'
        out = node.output[0]
        prefix = f'{node.name or out}.int'
        nodes: list[onnx.NodeProto] = []
        x_int, x_zp, a_kind, lo, hi, zx_val = self.activation_operand(x_dq, zx, prefix, nodes)
        if shift is not None:
            return self.rewrite_shift(node, shift, x_int, x_zp, (lo - zx_val, hi - zx_val),
                                      float(sx.reshape(())), bias, prefix, nodes)
        codes = idx.const(w_dq.input[0])
        sw = idx.const(w_dq.input[1])
        zw = idx.const(w_dq.input[2]) if len(w_dq.input) > 2 and w_dq.input[2] else None
        if codes is None or sw is None:
            return 'weight parameters are not constants'
        if attrs(w_dq).get('axis', 1) != 0 and sw.size != 1:
            return 'weight not quantized per output channel (axis 0)'

        # weight operand: codes [C_out, ...] (Gemm: transB=1, so [C_out, K] as well)
        gemm = node.op_type == 'Gemm'
        if gemm and not attrs(node).get('transB', 0):
            return 'Gemm weight not [C_out, K] (transB=0)'
        codes = codes.astype(np.int64)
        zw_arr = (np.zeros(codes.shape[0], np.int64) if zw is None
                  else np.broadcast_to(zw.astype(np.int64).reshape(-1), (codes.shape[0],)).copy())
        centred = codes - zw_arr.reshape([-1] + [1] * (codes.ndim - 1))
        if centred.min() >= -128 and centred.max() <= 127:
            w_arr, w_zp_arr, w_kind = centred.astype(np.int8), None, 'int8'
        else:
            carrier = np.dtype(zw.dtype)
            w_arr, w_zp_arr, w_kind = codes.astype(carrier), zw_arr.astype(carrier), str(carrier)
        wname = self.init(np.ascontiguousarray(w_arr.T if gemm else w_arr),
                          f'rq_w{len(self.report.weights)}')   # an identifier: TVM keeps it
        max_x = max(abs(lo - zx_val), abs(hi - zx_val))
        max_w = int(np.abs(centred).max(initial=0))
        reduce = int(np.prod(codes.shape[1:]))              # C_in / groups * kh * kw, or K
        self.report.accumulate[wname] = _accumulator(reduce, max_x, max_w)
        qmin, qmax = _weight_grid(idx, w_dq, codes)
        self.report.weights[wname] = PackedWeight(codes=codes, zero_point=zw_arr, qmin=qmin,
                                                  qmax=qmax, transpose=gemm,
                                                  centred=w_zp_arr is None)
        inputs = [x_int, wname]
        if x_zp or w_zp_arr is not None:
            inputs.append(x_zp)
        if w_zp_arr is not None:
            inputs.append(self.init(w_zp_arr, f'{prefix}.w_zp'))
        acc = f'{prefix}.acc'
        if node.op_type == 'Conv':
            nodes.append(helper.make_node('ConvInteger', inputs, [acc], name=f'{prefix}/Conv',
                                          **_conv_attrs(node)))
        else:
            nodes.append(helper.make_node('MatMulInteger', inputs, [acc],
                                          name=f'{prefix}/MatMul'))
        accf = f'{prefix}.acc_f'
        nodes.append(helper.make_node('Cast', [acc], [accf], to=TensorProto.FLOAT,
                                      name=f'{prefix}/CastAcc'))
        scale = (np.float32(sx.reshape(())) * sw.astype(np.float32).reshape(-1)).astype(np.float32)
        if node.op_type == 'Conv' and scale.size > 1:
            scale = scale.reshape(-1, *([1] * (len(codes.shape) - 2)))
        sname = self.init(scale if scale.size > 1 else scale.reshape(()), f'{prefix}.rescale')
        scaled = out if bias is None else f'{prefix}.scaled'
        nodes.append(helper.make_node('Mul', [accf, sname], [scaled], name=f'{prefix}/Rescale'))
        self.add_bias(nodes, scaled, out, bias, prefix,
                      len(codes.shape) - 2 if node.op_type == 'Conv' else 0)
        self.replacements[out] = nodes
        self.report.layers[out] = (a_kind, w_kind)
        return None


def _conv_attrs(node: onnx.NodeProto) -> dict:
    """The attributes a ``Conv`` hands on to its ``ConvInteger``."""
    return {k: v for k, v in attrs(node).items()
            if k in ('dilations', 'group', 'kernel_shape', 'pads', 'strides')}


def _accumulator(reduce: int, max_x: int, max_w: int) -> str:
    """``'float32'`` when every partial sum of ``reduce`` products of ``|x| <= max_x`` and
    ``|w| <= max_w`` is an integer below 2^24 (exact in float32 lanes), else ``'int32'``."""
    return 'float32' if reduce * max_x * max_w < FP32_EXACT else 'int32'


def _weight_grid(index: GraphIndex, w_dq: onnx.NodeProto, codes: np.ndarray) -> tuple[int, int]:
    """The weight grid from its initializer type (INT4 → -8..7, UINT4 → 0..15, ...)."""
    init = index.inits[w_dq.input[0]]
    return {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15), TensorProto.INT8: (-128, 127),
            TensorProto.UINT8: (0, 255)}.get(init.data_type,
                                             (int(codes.min()), int(codes.max())))


def to_integer_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, IntegerReport]:
    """Integer form of an exported Q/DQ model (module doc); the input is not modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = IntegerReport()
    rewriter = _Rewriter(out, report)
    for node in out.graph.node:
        if node.op_type in ('Conv', 'Gemm'):
            reason = rewriter.rewrite(node)
            if reason is not None:
                report.skipped[node.name or node.output[0]] = reason
    nodes = []
    for node in out.graph.node:
        if node.output and node.output[0] in rewriter.replacements:
            nodes.extend(rewriter.replacements[node.output[0]])
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(rewriter.new_inits)
    merged = merge_duplicate_nodes(out)
    if merged:
        logger.info('integer graph: %d duplicate elementwise nodes merged', merged)
    _remove_dead(out)
    onnx.checker.check_model(out, full_check=True)
    logger.info('integer graph: %s', report.summary())
    return out, report


#: ops :func:`merge_duplicate_nodes` merges: deterministic and elementwise
_MERGEABLE = frozenset({'QuantizeLinear', 'DequantizeLinear', 'Clip', 'Cast', 'Sub', 'Add',
                        'Mul', 'Relu'})


def merge_duplicate_nodes(model: onnx.ModelProto) -> int:
    """Merge nodes that compute the same value: the same elementwise op (``_MERGEABLE``)
    with the same attributes on the same inputs (constants compared by value), e.g. the
    two or three activation quantizers of the convs that read one tensor (FPN outputs
    into the class and box towers, a ResNet stage into the next stage, its shortcut and
    the FPN lateral; calibrated on the same tensor, so the same scale). One quantize pass
    instead of several, and with one consumer left the float tensor's quantize fuses into
    the producing convolution (``tvm/vnni.py``). Graph outputs are kept. Returns the
    number of nodes removed (their consumers read the kept node's output)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    keys: dict[str, tuple] = {}

    def operand(name: str) -> tuple:
        if name not in keys:
            init = inits.get(name)
            keys[name] = (('value', init.data_type, tuple(init.dims),
                           numpy_helper.to_array(init).tobytes()) if init is not None
                          else ('tensor', name))
        return keys[name]

    rename: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    kept = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if node.op_type == 'Constant' and len(node.output) == 1 and node.attribute \
                and node.attribute[0].name == 'value':
            t = node.attribute[0].t
            keys[node.output[0]] = ('value', t.data_type, tuple(t.dims),
                                    numpy_helper.to_array(t).tobytes())
        elif node.op_type in _MERGEABLE and node.domain in ('', 'ai.onnx') and \
                len(node.output) == 1 and node.output[0] not in outputs:
            key = (node.op_type, tuple(operand(i) for i in node.input),
                   tuple(sorted(a.SerializeToString() for a in node.attribute)))
            if key in seen:
                rename[node.output[0]] = seen[key]
                continue
            seen[key] = node.output[0]
        kept.append(node)
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    return removed


def _remove_dead(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers no graph output depends on."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in needed or i.name not in
              {t.name for t in inits}]
    del graph.input[:]
    graph.input.extend(inputs)
