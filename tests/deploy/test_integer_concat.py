"""``integer_concats``: a Concat that only our quantizer reads joins 8-bit codes, exactly."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mmdet_regptq.deploy.onnx.concat import integer_concats
from mmdet_regptq.deploy.onnx.graph import GraphIndex
from mmdet_regptq.deploy.onnx.session import ort_session_options

SHAPE = [1, 4, 8, 8]


def _q(x: str, y: str, scale: str = 'sc') -> list:
    """``Q → DQ`` of ``x`` (uint8, zero point 100) writing ``y``."""
    return [helper.make_node('QuantizeLinear', [x, scale, 'zp'], [f'{y}.q']),
            helper.make_node('DequantizeLinear', [f'{y}.q', scale, 'zp'], [y])]


def _graph() -> onnx.ModelProto:
    """SPPF and PAN in small: ``cat(silu(x), MaxPool, MaxPool∘MaxPool, nearest 2x of u)``
    quantized once (rewritten); a concat also read as float and one read by quantizers of
    two scales (both kept)."""
    pool = dict(kernel_shape=[5, 5], pads=[2] * 4, strides=[1, 1])
    nodes = [
        helper.make_node('Sigmoid', ['x'], ['s']),
        helper.make_node('Mul', ['x', 's'], ['a']),
        helper.make_node('MaxPool', ['a'], ['m1'], **pool),
        helper.make_node('MaxPool', ['m1'], ['m2'], **pool),
        helper.make_node('Resize', ['u', '', 'scales'], ['r'], mode='nearest'),
        helper.make_node('Concat', ['a', 'm1', 'm2', 'r'], ['cat'], name='sppf', axis=1),
        *_q('cat', 'y1'),
        helper.make_node('QuantizeLinear', ['cat', 'sc', 'zp'], ['cat.q2']),    # a duplicate
        helper.make_node('DequantizeLinear', ['cat.q2', 'sc', 'zp'], ['y2']),
        helper.make_node('Concat', ['a', 'm1'], ['cat_float'], name='also_float', axis=1),
        *_q('cat_float', 'y3'),
        helper.make_node('Relu', ['cat_float'], ['y4']),
        helper.make_node('Concat', ['a', 'r'], ['cat_two'], name='two_scales', axis=1),
        *_q('cat_two', 'y5'), *_q('cat_two', 'y6', scale='sc2'),
    ]
    inits = [numpy_helper.from_array(np.array(0.03, np.float32), 'sc'),
             numpy_helper.from_array(np.array(0.07, np.float32), 'sc2'),
             numpy_helper.from_array(np.array(100, np.uint8), 'zp'),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), 'scales')]
    channels = {'y1': 16, 'y2': 16, 'y3': 8, 'y4': 8, 'y5': 8, 'y6': 8}
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, SHAPE),
                     helper.make_tensor_value_info('u', TensorProto.FLOAT, [1, 4, 4, 4])],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, [1, c, 8, 8])
         for k, c in channels.items()], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), ort_session_options(1),
                                   providers=['CPUExecutionProvider'])
    return session.run(None, feeds)


def test_concat_read_only_by_one_quantizer_joins_the_codes_exactly():
    model = _graph()
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert integer_concats(rewritten) == ['sppf']
    onnx.checker.check_model(rewritten, full_check=True)
    index = GraphIndex(rewritten)
    joined = index.producer['y1.q']
    assert joined.op_type == 'Concat'
    # every input of the joined concat is 8-bit: quantized, or pooled / resized codes
    for name in joined.input:
        assert index.producer[name].op_type in ('QuantizeLinear', 'MaxPool', 'Resize')
    # the float MaxPool chain is gone (the one left reading float `a` feeds `also_float`)
    float_pools = [n for n in rewritten.graph.node if n.op_type == 'MaxPool' and n.input[0] == 'a']
    assert len(float_pools) == 1 and index.users(float_pools[0].output[0])[0].name == 'also_float'
    # the duplicate quantizer's reader now reads the joined codes
    assert 'cat.q2' not in index.consumers
    rng = np.random.default_rng(0)
    for scale in (1.0, 4.0):      # inside and past the 8-bit range (clipping)
        feeds = {'x': (rng.standard_normal(SHAPE) * scale).astype(np.float32),
                 'u': (rng.standard_normal([1, 4, 4, 4]) * scale).astype(np.float32)}
        for got, want in zip(_run(rewritten, feeds), _run(model, feeds)):
            np.testing.assert_array_equal(got, want)


def test_graph_without_such_concat_is_left_alone():
    """With a float reader on the SPPF concat too, no concat qualifies: nothing changes."""
    model = _graph()
    model.graph.node.append(helper.make_node('Identity', ['cat'], ['cat_id']))
    model.graph.output.append(helper.make_tensor_value_info('cat_id', TensorProto.FLOAT, None))
    before = model.SerializeToString()
    assert integer_concats(model) == []
    assert model.SerializeToString() == before


def test_make_ort_int8_runs_a_c3_like_concat_in_8_bits(tmp_path, monkeypatch):
    """A W8A8 ``cat(silu(conv), MaxPool, silu(conv)) → conv`` net: ``make_ort_int8`` joins
    the codes (report), and the outputs equal those of the same rewrite without this step."""
    import torch
    from torch import nn

    from deploy_toy import make_quantized
    from mmdet_regptq.deploy import export_onnx, make_ort_int8
    from mmdet_regptq.deploy.onnx import ort_int8

    class CatNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
            self.pool = nn.MaxPool2d(5, 1, 2)
            self.out = nn.Conv2d(24, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = nn.functional.silu(self.c1(x))
            return self.out(torch.cat([a, self.pool(a), nn.functional.silu(self.c2(x))], 1))

    model, x = make_quantized(dict(w_bits=8, a_bits=8), net=CatNet)
    path = tmp_path / 'cat.onnx'
    export_onnx(model, x, path, output_names=['out'])
    rewritten, report = make_ort_int8(onnx.load(str(path)), [{'input': x.numpy()}])
    assert len(report.integer_concats) == 1 and '1 concats in 8 bits' in report.summary()
    index = GraphIndex(rewritten)
    cat = next(n for n in rewritten.graph.node if n.op_type == 'Concat')
    assert [index.producer[i].op_type for i in cat.input] == [
        'QuantizeLinear', 'MaxPool', 'QuantizeLinear']
    assert {n.op_type for n in index.users(cat.output[0])} == {'DequantizeLinear'}
    monkeypatch.setattr(ort_int8, 'integer_concats', lambda model: [])
    reference, _ = make_ort_int8(onnx.load(str(path)), [{'input': x.numpy()}])
    index = GraphIndex(reference)
    cat = next(n for n in reference.graph.node if n.op_type == 'Concat')
    assert {n.op_type for n in index.users(cat.output[0])} == {'QuantizeLinear'}
    feed = {'input': x.numpy()}
    np.testing.assert_array_equal(_run(rewritten, feed)[0], _run(reference, feed)[0])


def test_a_linear_resize_is_quantized_after_not_before():
    """A linear ``Resize`` makes new values, so the quantizer stays below it."""
    model = _graph()
    for node in model.graph.node:
        if node.op_type == 'Resize':
            del node.attribute[:]
            node.attribute.append(helper.make_attribute('mode', 'linear'))
    assert integer_concats(model) == ['sppf']
    index = GraphIndex(model)
    resize = next(n for n in model.graph.node if n.op_type == 'Resize')
    assert resize.input[0] == 'u' and index.users(resize.output[0])[0].op_type == 'QuantizeLinear'
