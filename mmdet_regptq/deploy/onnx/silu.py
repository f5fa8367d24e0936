"""SiLU as one ONNX Runtime node: ``Sigmoid(x) → Mul(x, ·)`` becomes ``com.microsoft.QuickGelu``
with ``alpha = 1`` (``x · σ(1 · x)``, the same function), for graphs that ONNX Runtime runs.

ORT's own ``QuickGeluFusion`` does this on float graphs at ``ORT_ENABLE_ALL``, but not in
our INT8 graph: there ``x`` is a ``DequantizeLinear`` output, and ORT first gives each of
its two consumers a copy of that node (its QDQ node-unit clean-up), so the Sigmoid and the
Mul no longer read the same tensor and the pattern is gone. Fused beforehand, the SiLU
runs as one vectorized pass instead of two kernels and two dequantizations. Only for ORT
graphs: the op is an ORT contrib op that TVM's and TensorRT's ONNX importers lack.
"""
from __future__ import annotations

import onnx
from onnx import helper

from mmdet_regptq.deploy.onnx.graph import GraphIndex

__all__ = ['fuse_silu', 'expand_silu', 'ORT_DOMAIN']

#: the domain of ONNX Runtime's contrib ops (``QuickGelu`` is version 1 there)
ORT_DOMAIN = 'com.microsoft'


def _silu_pairs(index: GraphIndex) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """``(Sigmoid, Mul)`` pairs computing ``x · σ(x)`` whose sigmoid nothing else reads."""
    pairs = []
    for node in index.model.graph.node:
        if node.op_type != 'Sigmoid' or node.domain not in ('', 'ai.onnx'):
            continue
        out = node.output[0]
        users = index.users(out)
        if out in index.graph_outputs or len(users) != 1:
            continue
        mul = users[0]
        if mul.op_type != 'Mul' or mul.domain not in ('', 'ai.onnx') or len(mul.input) != 2:
            continue
        if sorted(mul.input) == sorted([node.input[0], out]):
            pairs.append((node, mul))
    return pairs


def fuse_silu(model: onnx.ModelProto) -> int:
    """Replace every ``Sigmoid(x) → Mul(x, σ)`` of ``model`` (in place) by one
    ``com.microsoft.QuickGelu(x, alpha=1.0)`` writing the Mul's output; adds the
    ``com.microsoft`` opset import when a pair was fused.

    Returns:
        the number of pairs fused.
    """
    index = GraphIndex(model)
    pairs = _silu_pairs(index)
    if not pairs:
        return 0
    fused = {mul.output[0]: sig.input[0] for sig, mul in pairs}    # Mul output -> x
    dropped = {sig.output[0] for sig, _ in pairs}
    nodes = []
    for node in model.graph.node:
        if node.op_type == 'Sigmoid' and node.output[0] in dropped:
            continue
        if node.op_type == 'Mul' and node.output[0] in fused:
            node = helper.make_node('QuickGelu', [fused[node.output[0]]], [node.output[0]],
                                    name=(node.name or node.output[0]) + '/QuickGelu',
                                    domain=ORT_DOMAIN, alpha=1.0)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [v for v in model.graph.value_info if v.name not in dropped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    if all(o.domain != ORT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
    return len(pairs)


def expand_silu(model: onnx.ModelProto) -> int:
    """The inverse of :func:`fuse_silu` (in place): every ``QuickGelu`` with ``alpha = 1``
    back to ``Sigmoid → Mul``, e.g. to time a graph both ways. Returns how many."""
    nodes, count = [], 0
    for node in model.graph.node:
        alpha = next((a.f for a in node.attribute if a.name == 'alpha'), 1.702)
        if node.op_type != 'QuickGelu' or node.domain != ORT_DOMAIN or alpha != 1.0:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        nodes += [helper.make_node('Sigmoid', [x], [f'{y}.sigmoid'], name=f'{node.name}/Sigmoid'),
                  helper.make_node('Mul', [x, f'{y}.sigmoid'], [y], name=f'{node.name}/Mul')]
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count
