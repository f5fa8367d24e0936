"""Concatenations in 8 bits: a float ``Concat`` that only our next quantizer reads runs on
the quantized inputs instead, for graphs that ONNX Runtime runs.

YOLOv5's C3 blocks, SPPF and PAN concatenate float SiLU outputs and quantize the result
once (the next conv's input quantizer), so ORT copies 4-byte floats through ``Concat``,
SPPF's ``MaxPool`` and the PAN's nearest ``Resize``. Quantizing each input with the
concat's own ``(scale, zero point)`` first gives the same codes, exactly: quantization is
elementwise, ``MaxPool`` picks one element of its window and quantization is monotone,
and a nearest ``Resize`` only copies elements. So ``Q(Concat(a, MaxPool(a)))`` becomes
``Concat(Q(a), MaxPool(Q(a)))`` on ``uint8``, which ORT runs natively.
"""
from __future__ import annotations

import onnx
from onnx import helper

from mmdet_regptq.deploy.onnx.graph import GraphIndex, attrs

__all__ = ['integer_concats']

#: ops that only move or pick input elements, so they commute with a monotone quantizer
_ORDER_PRESERVING = ('MaxPool', 'Resize')


def _scalar_qparams(index: GraphIndex, quantizers: list[onnx.NodeProto]) -> tuple | None:
    """The one ``(scale, zero point, attributes)`` of ``quantizers``, if they share it and
    it is per tensor."""
    found = set()
    for q in quantizers:
        scale = index.const(q.input[1])
        zero = index.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        if scale is None or scale.size != 1 or (zero is not None and zero.size != 1):
            return None
        found.add((float(scale.reshape(())), None if zero is None else
                   (zero.dtype.str, int(zero.reshape(()))),
                   tuple(sorted((k, str(v)) for k, v in attrs(q).items()))))
    return found.pop() if len(found) == 1 else None


def _commutes(node: onnx.NodeProto | None) -> bool:
    """Whether ``Q(node(x)) == node(Q(x))`` for a monotone per-tensor quantizer ``Q``."""
    if node is None or node.op_type not in _ORDER_PRESERVING or node.domain not in ('', 'ai.onnx'):
        return False
    if node.op_type == 'MaxPool':
        return len(node.output) == 1 or not node.output[1]        # no indices output
    mode = attrs(node).get('mode', b'nearest')
    return (mode.decode() if isinstance(mode, bytes) else mode) == 'nearest'


class _Quantized:
    """Builds the quantized version of float tensors for one quantizer, memoized, pushing
    the quantizer above order-preserving ops (a ``MaxPool`` chain is quantized once, at
    its start)."""

    def __init__(self, index: GraphIndex, quantizer: onnx.NodeProto, tag: str) -> None:
        self.index, self.quantizer, self.tag = index, quantizer, tag
        self.nodes: list[onnx.NodeProto] = []
        self.done: dict[str, str] = {}
        self.copied: list[onnx.NodeProto] = []     # float producers given a quantized copy

    def of(self, tensor: str) -> str:
        if tensor in self.done:
            return self.done[tensor]
        producer = self.index.producer.get(tensor)
        out = f'{tensor}.{self.tag}'
        if _commutes(producer):
            node = onnx.NodeProto()
            node.CopyFrom(producer)
            node.input[0] = self.of(producer.input[0])
            del node.output[:]
            node.output.append(out)
            node.name = f'{producer.name or tensor}/{self.tag}'
            self.copied.append(producer)
        else:
            node = helper.make_node('QuantizeLinear', [tensor, *self.quantizer.input[1:]], [out],
                                    name=f'{tensor}/{self.tag}/QuantizeLinear')
            node.attribute.extend(self.quantizer.attribute)
        self.nodes.append(node)
        self.done[tensor] = out
        return out


def integer_concats(model: onnx.ModelProto) -> list[str]:
    """Move each ``Concat`` whose only readers are QuantizeLinear nodes with one per-tensor
    ``(scale, zero point)`` below that quantization (in place; module doc): its inputs are
    quantized with those parameters (through ``MaxPool`` / nearest ``Resize`` producers),
    the ``Concat`` joins the codes and writes the quantizers' output. Exact.

    Returns:
        the names of the rewritten Concat nodes.
    """
    index = GraphIndex(model)
    added: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    renames: dict[str, str] = {}
    copied: set[int] = set()
    done = []
    for node in model.graph.node:
        if node.op_type != 'Concat' or node.domain not in ('', 'ai.onnx'):
            continue
        readers = index.users(node.output[0])
        if (node.output[0] in index.graph_outputs or not readers
                or any(r.op_type != 'QuantizeLinear' for r in readers)
                or _scalar_qparams(index, readers) is None):
            continue
        builder = _Quantized(index, readers[0], f'q{len(done)}')
        codes = [builder.of(t) for t in node.input]
        joined = helper.make_node('Concat', codes, [readers[0].output[0]],
                                  name=f'{node.name or node.output[0]}/quantized')
        joined.attribute.extend(node.attribute)
        added[id(node)] = builder.nodes + [joined]
        dropped.update(id(r) for r in readers)
        renames.update({r.output[0]: readers[0].output[0] for r in readers[1:]})
        copied.update(id(n) for n in builder.copied)
        done.append(node.name or node.output[0])
    if not done:
        return []
    nodes = []
    for node in model.graph.node:
        if id(node) in dropped:
            continue
        nodes.extend(added.get(id(node), [node]))      # the float Concat leaves here
    for node in nodes:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(_without_dead_floats(nodes, model, copied))
    return done


def _without_dead_floats(nodes: list[onnx.NodeProto], model: onnx.ModelProto,
                         copied: set[int]) -> list:
    """Drop the float ``MaxPool`` / ``Resize`` nodes (``copied``: ids) that nothing reads
    any more, their quantized copies having replaced them."""
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        kept = [n for n in nodes if id(n) not in copied
                or any(o in read for o in n.output if o)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept
