"""A float layer between quantized ones stays float in ONNX Runtime: its dequantized input
becomes per-axis, so ORT does not quantize its weight to int8 (and, on a CPU without VNNI,
saturate it)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mmdet_regptq.deploy import export_onnx, make_ort_int8
from mmdet_regptq.deploy.onnx.float_layers import per_axis_inputs_for_float_layers
from mmdet_regptq.deploy.onnx.ort_int8 import u8s8_saturates

from deploy_toy import AddNet, make_quantized

X_SCALE, Y_SCALE = 1 / 255, 0.05


def _stem(size: int = 32) -> tuple[onnx.ModelProto, np.ndarray]:
    """``Q → DQ → Conv (float weight, 7x7 stride 2) → Relu → Q → DQ`` and its float weight."""
    rng = np.random.default_rng(0)
    weight = (rng.integers(-64, 65, (16, 3, 7, 7)) * 0.01).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(X_SCALE, np.float32), 'xs'),
             numpy_helper.from_array(np.array(0, np.uint8), 'xz'),
             numpy_helper.from_array(np.array(Y_SCALE, np.float32), 'ys'),
             numpy_helper.from_array(np.array(0, np.uint8), 'yz'),
             numpy_helper.from_array(weight, 'w'),
             numpy_helper.from_array(np.zeros(16, np.float32), 'b')]
    nodes = [helper.make_node('QuantizeLinear', ['x', 'xs', 'xz'], ['xq']),
             helper.make_node('DequantizeLinear', ['xq', 'xs', 'xz'], ['xd']),
             helper.make_node('Conv', ['xd', 'w', 'b'], ['c'], name='stem', kernel_shape=[7, 7],
                              strides=[2, 2], pads=[3] * 4),
             helper.make_node('Relu', ['c'], ['r']),
             helper.make_node('QuantizeLinear', ['r', 'ys', 'yz'], ['yq']),
             helper.make_node('DequantizeLinear', ['yq', 'ys', 'yz'], ['y'])]
    graph = helper.make_graph(
        nodes, 'stem', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 16, size // 2, size // 2])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)]), weight


def _session(model: onnx.ModelProto, tmp_path) -> tuple[ort.InferenceSession, onnx.ModelProto]:
    """A one-thread session and the graph ORT optimized it to."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=['CPUExecutionProvider'])
    return session, onnx.load(options.optimized_model_filepath)


def _float_conv_weights(optimized: onnx.ModelProto) -> list[np.ndarray]:
    inits = {i.name: i for i in optimized.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]) for n in optimized.graph.node
            if n.op_type == 'Conv' and n.input[1] in inits
            and inits[n.input[1]].data_type == TensorProto.FLOAT]


def test_float_conv_keeps_its_weight_and_computes_in_float(tmp_path):
    model, weight = _stem()
    assert per_axis_inputs_for_float_layers(model) == ['stem']
    onnx.checker.check_model(model, full_check=True)
    session, optimized = _session(model, tmp_path)
    assert not [n for n in optimized.graph.node if n.op_type == 'QLinearConv']
    kept = _float_conv_weights(optimized)
    assert len(kept) == 1 and np.array_equal(kept[0], weight)

    x = np.random.default_rng(1).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    xq = np.clip(np.round(x / X_SCALE), 0, 255) * X_SCALE
    ref = torch.nn.functional.conv2d(torch.from_numpy(xq).double(),
                                     torch.from_numpy(weight).double(), stride=2, padding=3)
    ref_codes = np.clip(np.round(ref.clamp(min=0).numpy() / Y_SCALE), 0, 255)
    codes = np.round(session.run(None, {'x': x})[0] / Y_SCALE)
    assert np.abs(codes - ref_codes).max() <= 1


def test_per_axis_copy_only_where_the_input_is_dequantized_per_tensor():
    model, _ = _stem()
    model.graph.node[2].input[0] = 'x'                # float input: nothing to do
    assert per_axis_inputs_for_float_layers(model) == []
    quantized, _ = _stem()
    w_q = numpy_helper.from_array(np.ones((16, 3, 7, 7), np.int8), 'wq')
    w_s = numpy_helper.from_array(np.array(0.01, np.float32), 'ws')
    quantized.graph.initializer.extend([w_q, w_s])
    quantized.graph.node.insert(0, helper.make_node('DequantizeLinear', ['wq', 'ws'], ['wd']))
    quantized.graph.node[3].input[1] = 'wd'          # a quantized layer: not touched
    assert per_axis_inputs_for_float_layers(quantized) == []


def test_fp_layers_stay_float_in_the_ort_int8_graph(single_thread, tmp_path):
    """The INT8 rewrite gives the FP conv the add's 8-bit value (the add runs in integers);
    ORT must still run that conv with its own float weight."""
    model, x = make_quantized(dict(w_bits=8, a_bits=8, fp_layers=['f']), net=AddNet)
    path = tmp_path / 'addnet.onnx'
    export_onnx(model, x[:1], path, output_names=['quantized', 'float'])
    fused, report = make_ort_int8(onnx.load(path), [{'input': x[:1].numpy()}],
                                  target_cpu='avx2' if u8s8_saturates() else 'vnni')
    assert report.float_kept == ['/f/Conv']
    assert 'float layers on a per-axis dequantized input' in report.summary()
    session, optimized = _session(fused, tmp_path)
    f_weight = model.f.weight.detach().numpy()
    assert any(w.shape == f_weight.shape and np.array_equal(w, f_weight)
               for w in _float_conv_weights(optimized))
    with torch.no_grad():
        ref = model(x[:1])[1].numpy()
    out = session.run(['float'], {'input': x[:1].numpy()})[0]
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize('trans_b', [0, 1])
def test_gemm_channel_axis(trans_b):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 5) if trans_b else (5, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), 's'),
             numpy_helper.from_array(np.array(3, np.uint8), 'z'),
             numpy_helper.from_array(weight, 'w')]
    nodes = [helper.make_node('QuantizeLinear', ['x', 's', 'z'], ['xq']),
             helper.make_node('DequantizeLinear', ['xq', 's', 'z'], ['xd']),
             helper.make_node('Gemm', ['xd', 'w'], ['y'], name='fc', transB=trans_b)]
    graph = helper.make_graph(nodes, 'fc', [helper.make_tensor_value_info(
        'x', TensorProto.FLOAT, [2, 5])], [helper.make_tensor_value_info(
            'y', TensorProto.FLOAT, [2, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])
    x = rng.uniform(-0.3, 2, (2, 5)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'],
                                  disabled_optimizers=['WeightBiasQuantization'])
    expected = before.run(None, {'x': x})[0]
    assert per_axis_inputs_for_float_layers(model) == ['fc']
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    np.testing.assert_allclose(after.run(None, {'x': x})[0], expected, rtol=1e-6, atol=1e-6)


_RUN_STEM = """
import sys
import numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
sess = ort.InferenceSession(sys.argv[2], providers=['CPUExecutionProvider'])
np.save(sys.argv[3], sess.run(None, {'x': x})[0])
"""


def test_float_conv_is_exact_on_avx2_kernels(tmp_path):
    """Without VNNI (ORT's AVX2 kernels through the CPUID shim) the float conv stays within
    one output code; ORT's own int8 weights would saturate its int16 pair sums there."""
    import subprocess
    import sys

    from mmdet_regptq.deploy.onnx.avx2_shim import avx2_env, build_avx2_shim, cpuid_faulting

    problem = cpuid_faulting()
    if problem or u8s8_saturates():
        pytest.skip(f'needs a VNNI CPU with CPUID faulting: {problem or "no VNNI here"}')
    model, weight = _stem(64)
    per_axis_inputs_for_float_layers(model)
    onnx.save(model, tmp_path / 'stem.onnx')
    x = np.random.default_rng(2).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / 'x.npy', x)
    done = subprocess.run([sys.executable, '-c', _RUN_STEM, str(tmp_path / 'x.npy'),
                           str(tmp_path / 'stem.onnx'), str(tmp_path / 'y.npy')],
                          env=avx2_env(build_avx2_shim(tmp_path / 'shim')),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    xq = np.clip(np.round(x / X_SCALE), 0, 255) * X_SCALE
    ref = torch.nn.functional.conv2d(torch.from_numpy(xq).double(),
                                     torch.from_numpy(weight).double(), stride=2, padding=3)
    ref_codes = np.clip(np.round(ref.clamp(min=0).numpy() / Y_SCALE), 0, 255)
    codes = np.round(np.load(tmp_path / 'y.npy') / Y_SCALE)
    assert np.abs(codes - ref_codes).max() <= 1
