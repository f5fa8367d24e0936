"""Merging duplicate elementwise nodes in the integer graph (``tvm/integer_graph.py``):
the same values with fewer passes."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mmdet_regptq.deploy.tvm.integer_graph import merge_duplicate_nodes


def _two_quantizers(second_scale: float) -> onnx.ModelProto:
    """``x`` quantized twice (separately named scales), clipped and cast, the two results
    added: the shape of a tensor read by two quantized convolutions."""
    nodes, inits = [], []
    branches = []
    for b, scale in enumerate((0.5, second_scale)):
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f's{b}'),
                  numpy_helper.from_array(np.array(0, np.int8), f'z{b}'),
                  numpy_helper.from_array(np.array(-8, np.int8), f'lo{b}'),
                  numpy_helper.from_array(np.array(7, np.int8), f'hi{b}')]
        nodes += [helper.make_node('QuantizeLinear', ['x', f's{b}', f'z{b}'], [f'q{b}']),
                  helper.make_node('Clip', [f'q{b}', f'lo{b}', f'hi{b}'], [f'c{b}']),
                  helper.make_node('Cast', [f'c{b}'], [f'i{b}'], to=TensorProto.INT16)]
        branches.append(f'i{b}')
    nodes.append(helper.make_node('Add', branches, ['y']))
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info('y', TensorProto.INT16, [2, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    return sess.run(None, {'x': x})[0]


def test_equal_quantizers_of_one_tensor_are_merged_with_the_same_result():
    model = _two_quantizers(0.5)
    merged = onnx.ModelProto()
    merged.CopyFrom(model)
    assert merge_duplicate_nodes(merged) == 3             # Quantize, Clip, Cast
    onnx.checker.check_model(merged, full_check=True)
    assert [n.op_type for n in merged.graph.node] == ['QuantizeLinear', 'Clip', 'Cast', 'Add']
    assert list(merged.graph.node[-1].input) == ['i0', 'i0']
    x = np.linspace(-6, 6, 16, dtype=np.float32).reshape(2, 8)
    np.testing.assert_array_equal(_run(merged, x), _run(model, x))


def test_quantizers_with_different_scales_stay_apart():
    model = _two_quantizers(0.25)
    assert merge_duplicate_nodes(model) == 0
    assert len(model.graph.node) == 7
