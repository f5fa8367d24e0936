"""``fuse_silu``: ``Sigmoid(x) → Mul(x, σ)`` as one ``com.microsoft.QuickGelu`` in ORT graphs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmdet_regptq.deploy.onnx.session import ort_session_options
from mmdet_regptq.deploy.onnx.silu import ORT_DOMAIN, fuse_silu

SHAPE = [1, 4, 8, 8]


def _model(nodes: list, inits: list, outputs: list[str]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, SHAPE) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])


def _float_graph() -> onnx.ModelProto:
    """Two SiLUs (one with the Mul's inputs swapped) and three look-alikes that must stay:
    a sigmoid with a second reader, a Mul of another tensor, a sigmoid that is an output."""
    nodes = [
        helper.make_node('Sigmoid', ['x'], ['s1']),
        helper.make_node('Mul', ['x', 's1'], ['y1']),              # SiLU
        helper.make_node('Sigmoid', ['y1'], ['s2']),
        helper.make_node('Mul', ['s2', 'y1'], ['y2']),             # SiLU, inputs swapped
        helper.make_node('Sigmoid', ['y2'], ['s3']),
        helper.make_node('Mul', ['y2', 's3'], ['y3']),
        helper.make_node('Add', ['s3', 'y3'], ['y4']),             # s3 read twice: keep
        helper.make_node('Sigmoid', ['y4'], ['s5']),
        helper.make_node('Mul', ['x', 's5'], ['y5']),              # x · σ(y4): keep
        helper.make_node('Sigmoid', ['y5'], ['s6']),               # graph output: keep
        helper.make_node('Mul', ['y5', 's6'], ['y6']),
    ]
    return _model(nodes, [], ['y6', 's6'])


def _qdq_graph() -> onnx.ModelProto:
    """A SiLU between DequantizeLinear and QuantizeLinear, as in the INT8 YOLOv5 graph."""
    scale = numpy_helper.from_array(np.array(0.05, np.float32), 'sc')
    zp = numpy_helper.from_array(np.array(128, np.uint8), 'zp')
    nodes = [
        helper.make_node('QuantizeLinear', ['x', 'sc', 'zp'], ['xq']),
        helper.make_node('DequantizeLinear', ['xq', 'sc', 'zp'], ['xd']),
        helper.make_node('Sigmoid', ['xd'], ['s']),
        helper.make_node('Mul', ['xd', 's'], ['y']),
        helper.make_node('QuantizeLinear', ['y', 'sc', 'zp'], ['yq']),
        helper.make_node('DequantizeLinear', ['yq', 'sc', 'zp'], ['out']),
    ]
    return _model(nodes, [scale, zp], ['out'])


def _run(model: onnx.ModelProto, x: np.ndarray, level=None) -> list[np.ndarray]:
    options = ort_session_options(1)
    if level is not None:
        options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=['CPUExecutionProvider'])
    return session.run(None, {'x': x})


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize('level', [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, None])
def test_fused_float_graph_matches_and_keeps_look_alikes(level):
    model = _float_graph()
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_silu(fused) == 2
    onnx.checker.check_model(fused, full_check=True)
    assert _ops(fused).count('QuickGelu') == 2
    assert _ops(fused).count('Sigmoid') == 3 and _ops(fused).count('Mul') == 3
    assert len(fused.graph.node) == len(model.graph.node) - 2
    gelu = [n for n in fused.graph.node if n.op_type == 'QuickGelu']
    assert all(n.domain == ORT_DOMAIN and n.attribute[0].f == 1.0 for n in gelu)
    assert [n.input[0] for n in gelu] == ['x', 'y1']
    assert any(o.domain == ORT_DOMAIN for o in fused.opset_import)
    x = np.random.default_rng(0).normal(0, 4, SHAPE).astype(np.float32)
    for a, b in zip(_run(model, x, level), _run(fused, x, level)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_nothing_to_fuse_leaves_the_graph_alone():
    model = _model([helper.make_node('Sigmoid', ['x'], ['s']),
                    helper.make_node('Mul', ['s', 's'], ['y'])], [], ['y'])
    before = model.SerializeToString()
    assert fuse_silu(model) == 0
    assert model.SerializeToString() == before


def test_qdq_silu_is_one_quickgelu_after_ort_optimizes():
    """ORT leaves the Q/DQ SiLU as Sigmoid + Mul (why the pass exists); fused, it runs one
    QuickGelu with the same quantized output."""
    model = _qdq_graph()
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_silu(fused) == 1

    def optimized(m: onnx.ModelProto, path: str) -> list[str]:
        options = ort_session_options(1)
        options.optimized_model_filepath = path
        ort.InferenceSession(m.SerializeToString(), options,
                             providers=['CPUExecutionProvider'])
        return _ops(onnx.load(path))

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        plain = optimized(model, f'{tmp}/plain.onnx')
        ours = optimized(fused, f'{tmp}/fused.onnx')
    assert 'QuickGelu' not in plain and {'Sigmoid', 'Mul'} <= set(plain)
    assert 'QuickGelu' in ours and 'Sigmoid' not in ours and 'Mul' not in ours
    x = np.random.default_rng(1).normal(0, 3, SHAPE).astype(np.float32)
    a, = _run(model, x)
    b, = _run(fused, x)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_expand_silu_undoes_fuse_silu():
    from mmdet_regptq.deploy.onnx.silu import expand_silu

    fused = _float_graph()
    assert fuse_silu(fused) == 2
    gelu = helper.make_node('QuickGelu', ['y6'], ['g'], domain=ORT_DOMAIN, alpha=1.702)
    fused.graph.node.append(gelu)                     # a real QuickGelu (alpha != 1) stays
    assert expand_silu(fused) == 2
    ops = _ops(fused)
    assert ops.count('QuickGelu') == 1 and ops.count('Sigmoid') == 5 and ops.count('Mul') == 5
    assert fuse_silu(fused) == 2


def test_make_ort_int8_writes_silu_as_quickgelu(tmp_path):
    """A W8A8 Conv-SiLU net through ``make_ort_int8``: both SiLUs become QuickGelu, which
    ORT keeps between its QLinearConvs, with the outputs of the Sigmoid + Mul graph."""
    import torch
    from torch import nn

    from deploy_toy import make_quantized
    from mmdet_regptq.deploy import export_onnx, make_ort_int8
    from mmdet_regptq.deploy.onnx.silu import expand_silu

    class SiLUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(nn.functional.silu(self.c2(nn.functional.silu(self.c1(x)))))

    model, x = make_quantized(dict(w_bits=8, a_bits=8), net=SiLUNet)
    path = tmp_path / 'silu.onnx'
    export_onnx(model, x, path, output_names=['out'])
    fused, report = make_ort_int8(onnx.load(str(path)), [{'input': x.numpy()}])
    assert report.silu_fused == 2 and '2 SiLU as QuickGelu' in report.summary()
    options = ort_session_options(1)
    options.optimized_model_filepath = str(tmp_path / 'opt.onnx')
    session = ort.InferenceSession(fused.SerializeToString(), options,
                                   providers=['CPUExecutionProvider'])
    ops = _ops(onnx.load(str(tmp_path / 'opt.onnx')))
    assert ops.count('QuickGelu') == 2 and 'Sigmoid' not in ops, ops
    assert ops.count('QLinearConv') >= 2, ops
    plain = onnx.ModelProto()
    plain.CopyFrom(fused)
    assert expand_silu(plain) == 2
    ref = ort.InferenceSession(plain.SerializeToString(), ort_session_options(1),
                               providers=['CPUExecutionProvider'])
    feed = {'input': x.numpy()}
    np.testing.assert_allclose(session.run(None, feed)[0], ref.run(None, feed)[0],
                               rtol=1e-6, atol=1e-6)
