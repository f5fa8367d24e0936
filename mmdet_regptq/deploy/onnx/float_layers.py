"""Keep float layers float in ONNX Runtime: a per-axis dequantization for a float-weight
Conv / ConvTranspose / Gemm whose input comes out of a per-tensor ``DequantizeLinear``.

ONNX Runtime (1.20 and later, ``WeightBiasQuantization``) quantizes the float weight of
such a node to int8 itself (per tensor, symmetric, full range) while it builds the session,
so the node then runs as an integer convolution: a layer the policy kept in floating point
(``fp_layers``) silently gets 8-bit weights (measured: up to 7 output codes off on a VNNI
CPU), and on a CPU without VNNI its full-range int8 weights saturate ORT's int16 pair sums
(up to 29 codes off). That pass only takes an input dequantized with a *scalar* scale, so
the float node here reads a ``DequantizeLinear`` of the same integer tensor with the scale
and zero point repeated along the channel axis: the same values, and the weight stays
float. The quantized layers (weights already dequantized) are not touched.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mmdet_regptq.deploy.onnx.graph import GraphIndex, attrs

__all__ = ['per_axis_inputs_for_float_layers']

_WEIGHTED_OPS = ('Conv', 'ConvTranspose', 'Gemm')


def _input_channels(node: onnx.NodeProto, weight: onnx.TensorProto) -> int:
    """The size of axis 1 (the channels) of ``node``'s input 0."""
    dims = list(weight.dims)
    a = attrs(node)
    if node.op_type == 'Conv':
        return dims[1] * int(a.get('group', 1))
    if node.op_type == 'ConvTranspose':
        return dims[0]
    if a.get('transA', 0):
        raise ValueError(f'{node.name}: Gemm with transA=1 is not supported here')
    return dims[1] if a.get('transB', 0) else dims[0]


def _is_float_initializer(index: GraphIndex, name: str) -> bool:
    init = index.inits.get(name)
    return init is not None and init.data_type == onnx.TensorProto.FLOAT


def per_axis_inputs_for_float_layers(model: onnx.ModelProto) -> list[str]:
    """Give every float-weight Conv / ConvTranspose / Gemm of ``model`` (in place) that
    reads a per-tensor ``DequantizeLinear`` its own per-axis copy of that dequantization
    (module doc).

    Returns:
        the names of the nodes changed.
    """
    index = GraphIndex(model)
    graph = model.graph
    added: dict[str, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    changed: list[str] = []
    for node in graph.node:
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2 or \
                not _is_float_initializer(index, node.input[1]):
            continue
        dq = index.producer_of(node.input[0], 'DequantizeLinear')
        if dq is None:
            continue
        scale = index.const(dq.input[1])
        zero = index.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if scale is None or scale.size != 1 or (zero is not None and zero.size != 1):
            continue
        channels = _input_channels(node, index.inits[node.input[1]])
        key = f'{node.input[0]}.per_axis{len(changed)}'
        new_inits.append(numpy_helper.from_array(
            np.full(channels, scale.reshape(()), scale.dtype), f'{key}.scale'))
        inputs = [dq.input[0], f'{key}.scale']
        if zero is not None:
            new_inits.append(numpy_helper.from_array(
                np.full(channels, zero.reshape(()), zero.dtype), f'{key}.zero_point'))
            inputs.append(f'{key}.zero_point')
        added.setdefault(dq.output[0], []).append(helper.make_node(
            'DequantizeLinear', inputs, [key], name=f'{key}/DequantizeLinear', axis=1))
        node.input[0] = key
        changed.append(node.name or node.output[0])
    if not changed:
        return changed
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for out in node.output:
            nodes.extend(added.get(out, []))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    return changed
