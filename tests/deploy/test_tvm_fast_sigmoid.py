"""``fast_sigmoid``: SiLU with TVM's vectorized ``fast_exp`` stays within float32 rounding of
libm's ``expf`` and moves a quantized code by at most one, rarely."""
from __future__ import annotations

import numpy as np


def _silu_graph(shape: list[int]):
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node('Sigmoid', ['x'], ['s']),
             helper.make_node('Mul', ['x', 's'], ['silu']),
             helper.make_node('QuantizeLinear', ['silu', 'scale', 'zp'], ['code'])]
    graph = helper.make_graph(
        nodes, 'silu', [helper.make_tensor_value_info('x', TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info('silu', TensorProto.FLOAT, shape),
         helper.make_tensor_value_info('code', TensorProto.UINT8, shape)],
        [numpy_helper.from_array(np.array(0.02, np.float32), 'scale'),
         numpy_helper.from_array(np.array(14, np.uint8), 'zp')])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])


def test_fast_sigmoid_matches_expf_within_rounding(single_thread):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from mmdet_regptq.deploy.tvm.build import compile_onnx
    from mmdet_regptq.deploy.tvm.fast_sigmoid import fast_sigmoid_pass

    shape = [1, 16, 256, 256]
    model = _silu_graph(shape)
    # every float from -20 to 20 in steps of ~4e-5 (SiLU's range and far tails)
    x = np.linspace(-20, 20, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    outs = {}
    for fast in (False, True):
        exe = compile_onnx(model, {'x': shape}, fast_sigmoid=fast)
        res = relax.VirtualMachine(exe, tvm.cpu())['main'](tvm.runtime.tensor(x, tvm.cpu()))
        outs[fast] = [r.numpy() for r in res]
    (silu, code), (fast_silu, fast_code) = outs[False], outs[True]
    ref = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(silu, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fast_silu, silu, rtol=2e-6, atol=1e-7)
    assert not np.array_equal(fast_silu, silu)        # really the other exp
    moved = np.abs(fast_code.astype(np.int32) - code.astype(np.int32))
    assert moved.max() <= 1 and (moved > 0).mean() < 1e-4

    mod = fast_sigmoid_pass()(from_onnx(model, shape_dict={'x': shape},
                                        keep_params_in_input=False))
    text = mod.script()
    assert 'R.sigmoid' not in text and 'fast_sigmoid' in text


def test_backend_config_fast_sigmoid_reaches_the_build(tmp_path, single_thread):
    """``backend_config=dict(fast_sigmoid=True)`` of a tvm_relax deploy config builds the
    artifact with it (``meta.json`` says so); left out, it stays off."""
    import json

    import onnx

    from mmdet_regptq.deploy.mmdeploy.managers import TVMRelaxManager

    path = tmp_path / 'silu.onnx'
    onnx.save(_silu_graph([1, 2, 4, 4]), str(path))
    for fast in (True, None):
        backend = dict(type='tvm_relax') if fast is None else dict(type='tvm_relax',
                                                                    fast_sigmoid=fast)
        work = tmp_path / f'fast_{fast}'
        files = TVMRelaxManager.to_backend([str(path)], str(work),
                                           dict(backend_config=backend))
        meta_file = next(f for f in files if f.endswith('meta.json'))
        meta = json.loads(open(meta_file).read())
        assert meta['fast_sigmoid'] is bool(fast)
