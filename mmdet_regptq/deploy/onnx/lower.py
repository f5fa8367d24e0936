"""Lowering of the export's custom ``mmdet_regptq`` nodes into standard ONNX Q/DQ.

``QuantAct`` → ``QuantizeLinear`` → [integer ``Clip`` for grids narrower than the carrier]
→ ``DequantizeLinear``; ``DequantizeWeight`` → integer initializer (INT4/UINT4 at opset >=
21 for <= 4-bit grids) + ``DequantizeLinear(axis=0)``; ``DequantizeShiftWeight`` → two int8
power-of-two initializers dequantized and added, plus the centre. ONNX only (no torch).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ['QUANT_DOMAIN', 'INT4_OPSET', 'ExportReport', 'lower_quant_ops', 'check_onnx']

logger = logging.getLogger(__name__)

#: Domain of the intermediate custom nodes (never left in a saved model).
QUANT_DOMAIN = 'mmdet_regptq'
#: First opset with INT4/UINT4 Q/DQ and 16-bit Q/DQ.
INT4_OPSET = 21


@dataclass
class ExportReport:
    """What the export did.

    Attributes:
        weights: ``name -> (bits, dtype)`` of every folded integer weight initializer.
        activations: ``name -> (qmin, qmax, carrier dtype)`` of every activation Q/DQ.
        float_weights: weight quantizers exported as float constants (non-uniform grids).
        opset: opset of the saved model.
    """

    weights: dict[str, tuple[int, str]] = field(default_factory=dict)
    activations: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    float_weights: list[str] = field(default_factory=list)
    opset: int = 0

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for _, dtype in self.weights.values():
            kinds[dtype] = kinds.get(dtype, 0) + 1
        return (f'{len(self.weights)} integer weights {kinds}, {len(self.activations)} '
                f'activation Q/DQ, {len(self.float_weights)} float-exported weight '
                f'quantizers, opset {self.opset}')


_CARRIERS = (  # (lo, hi, ONNX type, numpy dtype name)
    (0, 255, TensorProto.UINT8, 'uint8'),
    (-128, 127, TensorProto.INT8, 'int8'),
    (0, 65535, TensorProto.UINT16, 'uint16'),
    (-32768, 32767, TensorProto.INT16, 'int16'),
)
_INT4_CARRIERS = ((0, 15, TensorProto.UINT4, 'uint4'), (-8, 7, TensorProto.INT4, 'int4'))


def _carrier(qmin: int, qmax: int, int4: bool) -> tuple[int, int, int, str]:
    for lo, hi, onnx_type, name in ((_INT4_CARRIERS if int4 else ()) + _CARRIERS):
        if lo <= qmin and qmax <= hi:
            return lo, hi, onnx_type, name
    raise ValueError(f'no ONNX integer type holds the grid {qmin}..{qmax}')


def _np_array(values: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name in ('int4', 'uint4'):
        import ml_dtypes
        return np.asarray(values).astype(np.int64).astype(getattr(ml_dtypes, dtype_name))
    return np.asarray(values).astype(dtype_name)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == 'Constant' and node.output[0] == name:
            return numpy_helper.to_array(_attrs(node)['value'])
    raise ValueError(f'{name!r} is not a constant (initializer or Constant node)')


def lower_quant_ops(model: onnx.ModelProto, *, int4_weights: bool = True,
                    report: ExportReport | None = None,
                    target_opset: int | None = None) -> onnx.ModelProto:
    """Rewrite the ``mmdet_regptq`` custom nodes into standard Q/DQ (see the module doc).

    Args:
        model: model exported under ``export_mode`` (modified in place and returned).
        int4_weights: store grids of <= 4 bits as INT4/UINT4 initializers (needs opset >=
            21; otherwise int8/uint8 carriers are used and a warning is logged).
        report: filled with the lowered weights and activations.
        target_opset: raise the default-domain opset import to this (e.g. a model traced at
            20 by the TorchScript exporter, saved as 21 for INT4).

    Returns:
        The model, with the custom opset import removed.
    """
    report = report if report is not None else ExportReport()
    opset = _raise_opset(model, target_opset)
    if int4_weights and opset < INT4_OPSET:
        if any(n.domain == QUANT_DOMAIN and n.op_type == 'DequantizeWeight'
               and _attrs(n)['qmax'] - _attrs(n)['qmin'] < 16 for n in model.graph.node):
            logger.warning('int4_weights needs opset >= %d (got %d): int8 carriers are used',
                           INT4_OPSET, opset)
        int4_weights = False
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    consumed: set[str] = set()
    seen: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain != QUANT_DOMAIN:
            new_nodes.append(node)
            continue
        attrs = _attrs(node)
        name = attrs['name'].decode() if isinstance(attrs['name'], bytes) else attrs['name']
        calls = seen[name] = seen.get(name, 0) + 1
        if node.op_type == 'DequantizeShiftWeight':
            consumed.update(node.input)
            nodes, inits = _lower_shift_weight(model, node, name, attrs, first=calls == 1)
            report.weights[name] = (int(attrs['bits']), 'int8 shift')
        elif node.op_type == 'QuantAct':
            nodes, inits = _lower_act(node, name, attrs, calls, report)
        elif node.op_type == 'DequantizeWeight':
            consumed.add(node.input[0])
            nodes, inits = _lower_weight(model, node, name, attrs, calls, int4_weights, report)
        else:
            raise ValueError(f'unknown {QUANT_DOMAIN} node {node.op_type!r}')
        new_nodes += nodes
        new_inits += inits
    _replace_graph(model, new_nodes, new_inits, consumed)
    report.opset = opset
    return model


def _raise_opset(model: onnx.ModelProto, target_opset: int | None) -> int:
    """Raise the default-domain opset import to ``target_opset``; returns the opset."""
    for imp in model.opset_import:
        if imp.domain in ('', 'ai.onnx') and target_opset and imp.version < target_opset:
            imp.version = target_opset
            model.ir_version = max(model.ir_version, 10 if target_opset >= 21 else 8)
    return max((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')),
               default=0)


def _grid(attrs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[int], dict]:
    """``(scales, zero points, parameter shape, axis attribute)`` of a custom node."""
    scales = np.asarray(attrs['scales'], np.float32)
    zps = np.asarray(attrs['zero_points'], np.int64)
    per_tensor = attrs['axis'] < 0
    return (scales, zps, [] if per_tensor else [len(scales)],
            {} if per_tensor else {'axis': attrs['axis']})


def _lower_act(node: onnx.NodeProto, name: str, attrs: dict[str, Any], calls: int,
               report: ExportReport) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``QuantAct`` → ``QuantizeLinear`` → [``Clip``] → ``DequantizeLinear``."""
    qmin, qmax = attrs['qmin'], attrs['qmax']
    scales, zps, shape, q_attrs = _grid(attrs)
    lo, hi, _, dtype = _carrier(qmin, qmax, False)
    # a shared module (one head conv on every FPN level) quantizes once per call
    prefix = f'{name}.q' if calls == 1 else f'{name}.q{calls - 1}'
    inits = [numpy_helper.from_array(scales.reshape(shape), f'{prefix}.scale'),
             numpy_helper.from_array(_np_array(zps.reshape(shape), dtype),
                                     f'{prefix}.zero_point')]
    q_out = f'{prefix}.int'
    nodes = [helper.make_node(
        'QuantizeLinear', [node.input[0], f'{prefix}.scale', f'{prefix}.zero_point'],
        [q_out], name=f'{prefix}/QuantizeLinear', **q_attrs)]
    if (qmin, qmax) != (lo, hi):
        inits += [numpy_helper.from_array(_np_array(np.array(qmin), dtype), f'{prefix}.qmin'),
                  numpy_helper.from_array(_np_array(np.array(qmax), dtype), f'{prefix}.qmax')]
        nodes.append(helper.make_node('Clip', [q_out, f'{prefix}.qmin', f'{prefix}.qmax'],
                                      [f'{prefix}.clip'], name=f'{prefix}/Clip'))
        q_out = f'{prefix}.clip'
    nodes.append(helper.make_node(
        'DequantizeLinear', [q_out, f'{prefix}.scale', f'{prefix}.zero_point'],
        [node.output[0]], name=f'{prefix}/DequantizeLinear', **q_attrs))
    report.activations[name] = (qmin, qmax, dtype)
    return nodes, inits


def _lower_weight(model: onnx.ModelProto, node: onnx.NodeProto, name: str,
                  attrs: dict[str, Any], calls: int, int4_weights: bool, report: ExportReport
                  ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``DequantizeWeight`` → integer initializer + ``DequantizeLinear``."""
    qmin, qmax = attrs['qmin'], attrs['qmax']
    scales, zps, shape, dq_attrs = _grid(attrs)
    _, _, _, dtype = _carrier(qmin, qmax, int4_weights)
    inits = []
    if calls == 1:  # a shared module's later calls reuse the same initializers
        codes = _constant_value(model, node.input[0]).astype(np.int64)
        inits = [numpy_helper.from_array(_np_array(codes, dtype), f'{name}.int'),
                 numpy_helper.from_array(scales.reshape(shape), f'{name}.scale'),
                 numpy_helper.from_array(_np_array(zps.reshape(shape), dtype),
                                         f'{name}.zero_point')]
    nodes = [helper.make_node(
        'DequantizeLinear', [f'{name}.int', f'{name}.scale', f'{name}.zero_point'],
        [node.output[0]], name=f'{name}/DequantizeLinear{calls - 1}', **dq_attrs)]
    report.weights[name] = (int(np.ceil(np.log2(qmax - qmin + 1))), dtype)
    return nodes, inits


def _replace_graph(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                   inits: list[onnx.TensorProto], consumed: set[str]) -> None:
    """Install the lowered nodes; drop the traced constants only the custom nodes read and
    the custom opset import."""
    graph = model.graph
    still_used = {i for n in nodes for i in n.input}
    dead = consumed - still_used
    kept_nodes = [n for n in nodes if not (n.op_type == 'Constant' and n.output[0] in dead)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept_inits = [i for i in graph.initializer if i.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + inits)
    kept_inputs = [i for i in graph.input if i.name not in dead]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    opsets = [o for o in model.opset_import if o.domain != QUANT_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)


def _lower_shift_weight(model: onnx.ModelProto, node: onnx.NodeProto, name: str,
                        attrs: dict[str, Any], first: bool
                        ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``DequantizeShiftWeight`` → ``(DQ(pos; s_+) + DQ(neg; s_-)) + mu`` (axis 0, int8,
    zero point 0): standard ONNX whose value is the fake-quantized LLAQ weight exactly and
    which ``integer_graph`` turns into one int8 ``ConvInteger``."""
    inits = []
    if first:  # a shared module's later calls reuse the same initializers
        pos = _constant_value(model, node.input[0]).astype(np.int8)
        neg = _constant_value(model, node.input[1]).astype(np.int8)
        rows = pos.shape[0]
        zeros = np.zeros(rows, np.int8)
        mu = np.asarray(attrs['mu'], np.float32).reshape([rows] + [1] * (pos.ndim - 1))
        inits = [numpy_helper.from_array(pos, f'{name}.pos'),
                 numpy_helper.from_array(neg, f'{name}.neg'),
                 numpy_helper.from_array(np.asarray(attrs['scales_pos'], np.float32),
                                         f'{name}.scale_pos'),
                 numpy_helper.from_array(np.asarray(attrs['scales_neg'], np.float32),
                                         f'{name}.scale_neg'),
                 numpy_helper.from_array(zeros, f'{name}.zero_point'),
                 numpy_helper.from_array(mu, f'{name}.mu')]
    suffix = '' if first else f'_{node.output[0]}'
    nodes = [
        helper.make_node('DequantizeLinear', [f'{name}.pos', f'{name}.scale_pos',
                                              f'{name}.zero_point'], [f'{name}.pos_f{suffix}'],
                         name=f'{name}/DequantizePos{suffix}', axis=0),
        helper.make_node('DequantizeLinear', [f'{name}.neg', f'{name}.scale_neg',
                                              f'{name}.zero_point'], [f'{name}.neg_f{suffix}'],
                         name=f'{name}/DequantizeNeg{suffix}', axis=0),
        helper.make_node('Add', [f'{name}.pos_f{suffix}', f'{name}.neg_f{suffix}'],
                         [f'{name}.sides{suffix}'], name=f'{name}/AddSides{suffix}'),
        helper.make_node('Add', [f'{name}.sides{suffix}', f'{name}.mu'], [node.output[0]],
                         name=f'{name}/AddCentre{suffix}')]
    return nodes, inits


def check_onnx(model: onnx.ModelProto | str | Path) -> None:
    """``onnx.checker.check_model(full_check=True)`` (shape inference included).

    Raises:
        onnx.checker.ValidationError / onnx.shape_inference.InferenceError: invalid model.
    """
    onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model),
                             full_check=True)


