"""Long float reductions (GroupNorm statistics) on interleaved chains: same bits, new loops."""
from __future__ import annotations

import numpy as np
import pytest


def _group_norm_model(groups: int, size: int):
    """``InstanceNormalization`` over ``[1, groups, size]``: FCOS's GroupNorm as exported."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    scale = rng.standard_normal(groups).astype(np.float32)
    bias = rng.standard_normal(groups).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node('InstanceNormalization', ['x', 's', 'b'], ['y'], epsilon=1e-5)],
        'gn', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, groups, size])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, groups, size])],
        [numpy_helper.from_array(scale, 's'), numpy_helper.from_array(bias, 'b')])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), scale, bias


def _run(model, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    from mmdet_regptq.deploy.tvm.build import compile_onnx

    exe = compile_onnx(model, {'x': list(x.shape)})
    return relax.VirtualMachine(exe, tvm.cpu())['main'](tvm.runtime.tensor(x, tvm.cpu())).numpy()


@pytest.mark.parametrize('groups,size', [(16, 4096), (6, 1000)])
def test_interleaved_reduction_is_bit_identical(groups, size, single_thread, monkeypatch):
    """The interleaved schedule sums every output in the serial order: the GroupNorm
    output equals the serial schedule's bit for bit (and numpy's to float tolerance)."""
    from mmdet_regptq.deploy.tvm import schedule

    model, scale, bias = _group_norm_model(groups, size)
    x = (np.random.default_rng(1).standard_normal((1, groups, size)) * 3 + 2).astype(np.float32)
    fast = _run(model, x)
    monkeypatch.setattr(schedule, '_LONG_REDUCTION', 1 << 60)       # serial chains
    serial = _run(model, x)
    np.testing.assert_array_equal(fast.view(np.uint32), serial.view(np.uint32))
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(fast, ref * scale[:, None] + bias[:, None], atol=1e-4)


def test_long_reduction_interleaves_chains(single_thread):
    """The statistics of a 16-group GroupNorm: 4 chains per loop, the 65536 terms in
    chunks of 8, both unrolled; a short reduction (3x3 pooling window) keeps its loops."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.relax.frontend.onnx import from_onnx

    from mmdet_regptq.deploy.tvm.build import host_target
    from mmdet_regptq.deploy.tvm.schedule import schedule_cpu

    model, _, _ = _group_norm_model(16, 65536)
    target = host_target()
    mod = from_onnx(model, shape_dict={'x': [1, 16, 65536]}, keep_params_in_input=False)
    with target:
        mod = tvm.transform.Sequential(cpu_generic.library_dispatch_passes(target)
                                       + cpu_generic.legalize_passes(target))(mod)
    text = schedule_cpu(mod).script()
    assert 'T.unroll(T.int64(4))' in text and 'T.unroll(T.int64(8))' in text
    assert 'range(T.int64(8192))' in text and 'T.parallel(T.int64(4))' in text


def test_pooling_window_vectorized_exactly(single_thread, monkeypatch):
    """A 3x3 / stride-2 max pool (the ResNet stem's) gets 16 output columns as vector lanes
    inside its window loops: the same values as the scalar schedule and as torch."""
    import torch
    from onnx import TensorProto, helper

    from mmdet_regptq.deploy.tvm import schedule

    graph = helper.make_graph(
        [helper.make_node('MaxPool', ['x'], ['y'], kernel_shape=[3, 3], strides=[2, 2],
                          pads=[1, 1, 1, 1])], 'pool',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 5, 40, 64])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 5, 20, 32])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    x = np.random.default_rng(2).standard_normal((1, 5, 40, 64)).astype(np.float32)
    applied = []
    original = schedule._vectorize_short_reduction
    monkeypatch.setattr(schedule, '_vectorize_short_reduction',
                        lambda *a: applied.append(original(*a)) or applied[-1])
    fast = _run(model, x)
    assert applied == [True]
    monkeypatch.setattr(schedule, '_vectorize_short_reduction', lambda *a: False)
    serial = _run(model, x)
    np.testing.assert_array_equal(fast, serial)
    ref = torch.nn.functional.max_pool2d(torch.from_numpy(x), 3, 2, 1).numpy()
    np.testing.assert_array_equal(fast, ref)
