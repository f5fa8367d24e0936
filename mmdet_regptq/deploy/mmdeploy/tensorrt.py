"""Check an exported ONNX model against TensorRT's explicit-quantization rules.

TensorRT cannot be installed on any machine this project has (it needs an NVIDIA GPU and
its wheels; see README), so the TensorRT INT8 deployment is delivered as a deploy config
plus an ONNX model checked here against the rules TensorRT documents for explicitly
quantized networks (TensorRT developer guide, "Explicit Quantization" and "Q/DQ layer
placement"):

1. ``QuantizeLinear`` / ``DequantizeLinear`` are INT8: zero points present, of type
   ``int8`` and all 0 (symmetric); no ``uint8``, 4-bit or 16-bit Q/DQ;
2. scales are positive, finite float32;
3. activations are quantized per tensor (scalar scale);
4. weights are quantized per output channel on axis 0 (or per tensor): a DQ on a constant
   has a 1-D scale whose length is the weight's dimension 0, ``axis=0``;
5. a ``QuantizeLinear`` output feeds only ``DequantizeLinear`` nodes with the same scale
   (no op between Q and DQ, e.g. no integer ``Clip`` of a sub-8-bit grid);
6. opset >= 13 (per-axis Q/DQ).

Warnings (not errors): a Conv/Gemm/MatMul whose weight is quantized but whose input is
not (TensorRT then runs it in floating point).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from mmdet_regptq.deploy.onnx.graph import GraphIndex, attrs

__all__ = ['TensorRTCheck', 'check_tensorrt_qdq']


@dataclass
class TensorRTCheck:
    """Result of :func:`check_tensorrt_qdq`: ``errors`` (rule violations), ``warnings``,
    and counts of quantized activations / weights / int8 layers."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    activations: int = 0
    weights: int = 0
    int8_layers: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        state = 'OK' if self.ok else f'{len(self.errors)} violation(s)'
        return (f'TensorRT explicit quantization: {state}; {self.activations} activation Q/DQ, '
                f'{self.weights} per-channel int8 weights, {self.int8_layers} int8 layers, '
                f'{len(self.warnings)} warning(s)')


def check_tensorrt_qdq(model: onnx.ModelProto) -> TensorRTCheck:
    """Validate ``model`` against the rules in the module doc."""
    result = TensorRTCheck()
    err = result.errors.append
    opset = max((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')),
                default=0)
    if opset < 13:
        err(f'opset {opset} < 13: per-axis Q/DQ needs opset 13')
    index = GraphIndex(model)
    for node in model.graph.node:
        if node.op_type not in ('QuantizeLinear', 'DequantizeLinear'):
            continue
        where = f'{node.op_type} {node.name or node.output[0]!r}'
        scale = index.const(node.input[1])
        zp = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            err(f'{where}: scale is not a constant')
            continue
        if scale.dtype != np.float32 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            err(f'{where}: scale must be positive finite float32')
        if zp is None:
            err(f'{where}: zero point missing (TensorRT wants an explicit int8 zero point 0)')
        else:
            if zp.dtype != np.int8:
                err(f'{where}: zero point type {zp.dtype} (TensorRT INT8 needs int8)')
            if np.any(zp.astype(np.int64) != 0):
                err(f'{where}: zero point must be 0 (symmetric quantization)')
        axis = attrs(node).get('axis', 1)
        data_const = index.const(node.input[0]) is not None
        if node.op_type == 'DequantizeLinear' and data_const:
            result.weights += 1
            weight = index.const(node.input[0])
            if scale.size > 1:
                if axis != 0 or scale.ndim != 1 or scale.size != weight.shape[0]:
                    err(f'{where}: weight scales must be per output channel on axis 0 '
                        f'(axis={axis}, scale shape {scale.shape}, weight {weight.shape})')
            if weight.dtype != np.int8:
                err(f'{where}: weight of type {weight.dtype} (int8 required)')
        elif node.op_type == 'QuantizeLinear':
            result.activations += 1
            if scale.size != 1:
                err(f'{where}: activations must be quantized per tensor (scale {scale.shape})')
            users = index.users(node.output[0])
            if not users or any(u.op_type != 'DequantizeLinear' for u in users):
                kinds = sorted({u.op_type for u in users})
                err(f'{where}: output feeds {kinds}; TensorRT needs Q directly followed by DQ')
            for u in users:
                if u.op_type == 'DequantizeLinear' and u.input[1] != node.input[1] and not \
                        np.array_equal(index.const(u.input[1]), scale):
                    err(f'{where}: paired DQ {u.name!r} has another scale')
        elif node.op_type == 'DequantizeLinear':
            if index.producer_of(node.input[0], 'QuantizeLinear') is None:
                err(f'{where}: input is neither a constant nor a QuantizeLinear output')
    for node in model.graph.node:
        if node.op_type not in ('Conv', 'Gemm', 'MatMul') or len(node.input) < 2:
            continue
        w_q = index.producer_of(node.input[1], 'DequantizeLinear') is not None
        x_q = index.producer_of(node.input[0], 'DequantizeLinear') is not None
        if w_q and x_q:
            result.int8_layers += 1
        elif w_q:
            result.warnings.append(f'{node.op_type} {node.name!r}: weight quantized, input not '
                                   '(TensorRT runs it in float)')
    return result
