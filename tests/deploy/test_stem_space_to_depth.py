"""``space_to_depth_stems``: a stride-2 stem on few channels as a stride-1 conv on
``SpaceToDepth`` codes gives the same codes in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmdet_regptq.deploy.onnx.graph import GraphIndex, attrs
from mmdet_regptq.deploy.onnx.session import ort_session_options
from mmdet_regptq.deploy.onnx.stem import space_to_depth_stems, stem_geometry


@pytest.mark.parametrize('args, want', [
    ((512, 7, 3, 3), (4, 2, 1, 4)),      # ResNet stem
    ((640, 6, 2, 2), (2, 2, 0, 3)),      # YOLOv5 v6 stem
    ((511, 7, 3, 3), (4, 3, 1, 4)),      # odd input
    ((32, 3, 1, 1), (2, 0, 1, 2)),
    ((9, 2, 0, 0), None),                # the last row is never read: not expressible
])
def test_stem_geometry(args, want):
    assert stem_geometry(*args) == want


def _stem(size: int, kernel: int, pads: list[int], in_ch: int = 3, stride: int = 2,
          uint8_weights: bool = False, group: int = 1) -> onnx.ModelProto:
    """``Q → DQ → Conv → Q → DQ`` with per-channel weight codes (int8, zero point 0; or
    uint8 with per-channel zero points, as weights kept for a CPU without VNNI)."""
    rng = np.random.default_rng(size + kernel)
    out_ch = 8
    shape = (out_ch, in_ch // group, kernel, kernel)
    if uint8_weights:
        codes = rng.integers(0, 256, shape).astype(np.uint8)
        zero = rng.integers(100, 156, out_ch).astype(np.uint8)
    else:
        codes = rng.integers(-64, 65, shape).astype(np.int8)
        zero = np.zeros(out_ch, np.int8)
    inits = [numpy_helper.from_array(np.array(1 / 64, np.float32), 'xs'),
             numpy_helper.from_array(np.array(110, np.uint8), 'xz'),
             numpy_helper.from_array(np.array(0.05, np.float32), 'ys'),
             numpy_helper.from_array(np.array(7, np.uint8), 'yz'),
             numpy_helper.from_array(codes, 'wq'), numpy_helper.from_array(zero, 'wz'),
             numpy_helper.from_array((rng.random(out_ch) * 0.01 + 0.001).astype(np.float32),
                                     'ws'),
             numpy_helper.from_array(rng.standard_normal(out_ch).astype(np.float32), 'b')]
    nodes = [helper.make_node('QuantizeLinear', ['x', 'xs', 'xz'], ['xq']),
             helper.make_node('DequantizeLinear', ['xq', 'xs', 'xz'], ['xd']),
             helper.make_node('DequantizeLinear', ['wq', 'ws', 'wz'], ['w'], axis=0),
             helper.make_node('Conv', ['xd', 'w', 'b'], ['c'], name='stem',
                              kernel_shape=[kernel, kernel], strides=[stride, stride],
                              pads=pads, group=group),
             helper.make_node('Relu', ['c'], ['r']),
             helper.make_node('QuantizeLinear', ['r', 'ys', 'yz'], ['yq']),
             helper.make_node('DequantizeLinear', ['yq', 'ys', 'yz'], ['y'])]
    graph = helper.make_graph(
        nodes, 'stem', [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                                      [1, in_ch, size, size + 3])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['n', 'c', 'h', 'w'])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), ort_session_options(1),
                                   providers=['CPUExecutionProvider'])
    return session.run(None, {'x': x})[0]


@pytest.mark.parametrize('size, kernel, pads, uint8_weights', [
    (32, 7, [3, 3, 3, 3], False),
    (33, 7, [3, 3, 3, 3], True),
    (40, 6, [2, 2, 2, 2], False),
    (31, 3, [1, 0, 2, 1], True),
    (20, 4, [1, 0, 0, 1], False),
])
def test_rewritten_stem_gives_the_same_codes(size, kernel, pads, uint8_weights):
    model = _stem(size, kernel, pads, uint8_weights=uint8_weights)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert space_to_depth_stems(rewritten) == ['stem']
    onnx.checker.check_model(rewritten, full_check=True)
    index = GraphIndex(rewritten)
    conv = next(n for n in rewritten.graph.node if n.op_type == 'Conv')
    assert attrs(conv)['strides'] == [1, 1]
    assert index.producer_of(index.producer[conv.input[0]].input[0], 'SpaceToDepth')
    assert 'wq' not in index.inits                       # the old weight codes are gone
    x = np.random.default_rng(1).standard_normal([1, 3, size, size + 3]).astype(np.float32)
    x *= 3    # codes clipped at both ends too
    want = _run(model, x)
    got = _run(rewritten, x)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('kwargs', [dict(in_ch=8), dict(stride=1), dict(in_ch=4, group=2)])
def test_other_convs_are_left_alone(kwargs):
    model = _stem(16, 3, [1, 1, 1, 1], **kwargs)
    before = model.SerializeToString()
    assert space_to_depth_stems(model) == []
    assert model.SerializeToString() == before


def test_make_ort_int8_rewrites_a_resnet_stem(tmp_path, monkeypatch):
    """A W8A8 net with a 7x7 stride-2 stem through ``make_ort_int8``: the stem is
    rewritten (report) and the outputs equal those of the rewrite without this step."""
    import torch
    from torch import nn

    from deploy_toy import make_quantized
    from mmdet_regptq.deploy import export_onnx, make_ort_int8
    from mmdet_regptq.deploy.onnx import ort_int8

    class StemNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 7, 2, 3)
            self.out = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.stem(x)))

    model, x = make_quantized(dict(w_bits=8, a_bits=8), net=StemNet)
    path = tmp_path / 'stem.onnx'
    export_onnx(model, x, path, output_names=['out'])
    rewritten, report = make_ort_int8(onnx.load(str(path)), [{'input': x.numpy()}])
    assert len(report.stems) == 1 and '1 stems on SpaceToDepth' in report.summary()
    assert any(n.op_type == 'SpaceToDepth' for n in rewritten.graph.node)
    monkeypatch.setattr(ort_int8, 'space_to_depth_stems', lambda model: [])
    reference, _ = make_ort_int8(onnx.load(str(path)), [{'input': x.numpy()}])
    assert not any(n.op_type == 'SpaceToDepth' for n in reference.graph.node)
    feed = x.numpy()
    session = ort.InferenceSession(rewritten.SerializeToString(), ort_session_options(1),
                                   providers=['CPUExecutionProvider'])
    want = ort.InferenceSession(reference.SerializeToString(), ort_session_options(1),
                                providers=['CPUExecutionProvider']).run(None, {'input': feed})
    np.testing.assert_array_equal(session.run(None, {'input': feed})[0], want[0])
