"""Small helpers to read and edit ONNX graphs (producers, consumers, constants)."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ['GraphIndex', 'attrs', 'INT_TYPES']

#: ONNX integer element types → numpy dtype names (int4/uint4 via ml_dtypes).
INT_TYPES = {TensorProto.INT8: 'int8', TensorProto.UINT8: 'uint8', TensorProto.INT16: 'int16',
             TensorProto.UINT16: 'uint16', TensorProto.INT4: 'int4', TensorProto.UINT4: 'uint4',
             TensorProto.INT32: 'int32'}


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class GraphIndex:
    """Producer / consumer / initializer lookups of one graph (rebuild after edits)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.inits = {i.name: i for i in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant node output, also through Identity nodes
        (the exporter emits ``Identity`` for initializers with equal values); None if not
        constant."""
        for _ in range(16):
            if name in self.inits:
                return numpy_helper.to_array(self.inits[name])
            node = self.producer.get(name)
            if node is not None and node.op_type == 'Constant':
                return numpy_helper.to_array(attrs(node)['value'])
            if node is None or node.op_type != 'Identity':
                return None
            name = node.input[0]
        return None

    def users(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def producer_of(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None
