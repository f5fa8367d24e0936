"""The tvm_int4 backend end to end on a tiny net: mmdeploy's to_backend / build_wrapper,
integer ops, packed weights, outputs vs the fake-quant model (one compile, ~20 s)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from mmdet_regptq.deploy.onnx.verify import max_abs_diff, ort_run


def test_tvm_int4_compiles_and_matches(w4a4, tmp_path):
    from mmdeploy.apis.utils import to_backend
    from mmdeploy.backend.base import get_backend_manager

    import mmdet_regptq.deploy  # noqa: F401  (registers tvm_int4)

    model, x, path, _ = w4a4
    deploy_cfg = dict(backend_config=dict(type='tvm_int4'))
    files = to_backend('tvm_int4', [str(path)], str(tmp_path), deploy_cfg=deploy_cfg)
    assert [Path(f).name for f in files] == ['model.so', 'weights.npz', 'meta.json']
    meta = json.loads(Path(files[2]).read_text())
    assert sorted(w['bits'] for w in meta['weights']) == [4, 4, 4, 8]
    assert {tuple(v) for v in meta['layers'].values()} == {('int8', 'int8'), ('uint8', 'uint8')}
    # every layer's partial sums are integers below 2^24 here: exact in float32 lanes
    assert set(meta['accumulate'].values()) == {'float32'} and meta['scheduled']
    # on an AVX-512 VNNI CPU every conv runs the vpdpbusd kernel (the uint8 first layer
    # with its zero points through the split-weight form), on an AVX2 CPU the vpmaddubsw
    # kernel; weight layouts are lifted
    from mmdet_regptq.deploy.tvm.build import host_target
    from mmdet_regptq.deploy.tvm.vnni import int8_kernel
    # (the three convs, one of them grouped, at batch 2, and the Linear as a 1x1 conv)
    fast = {'vnni': ['vnni_int8'] * 4, 'avx2': ['avx2_int8'] * 3 + ['avx2_int8_split'],
            'generic': []}[int8_kernel(host_target())]
    kinds = sorted(meta['kernels'].values())
    assert [k for k in kinds if k != 'float32_accumulate'] == fast
    assert meta['transform_params']
    stored = np.load(files[1])
    packed = [stored[f'w{i}.words'] for i, w in enumerate(meta['weights']) if w['bits'] == 4]
    assert all(p.dtype == np.int32 for p in packed)
    wrapper = get_backend_manager('tvm_int4').build_wrapper(files, 'cpu')
    out = wrapper({'input': x})
    with torch.no_grad():
        ref = model(x)
    diff = max_abs_diff(ref, [out['feat'], out['logits']])
    ort = ort_run(onnx.load(str(path)), {'input': x.numpy()})
    print(f'TVM INT4 vs fake-quant: max |diff| = {diff:.3g}; vs ORT Q/DQ: '
          f'{max_abs_diff([ort["feat"], ort["logits"]], [out["feat"], out["logits"]]):.3g}')
    assert diff < 1e-4


def test_llaq_layer_deploys_as_int8_shifts(tmp_path, single_thread, capsys, load_script):
    """A power-of-two LLAQ layer: exported as two int8 DQ sides + the centre (exact in
    ORT), compiled as ONE integer conv with 2*C_out+1 outputs, stored as packed 4-bit
    shift codes."""
    from deploy_toy import make_quantized

    from mmdet_regptq.deploy import export_onnx
    from mmdet_regptq.deploy.tvm.build import build_artifact, host_target
    from mmdet_regptq.deploy.tvm.runner import TvmRunner
    from mmdet_regptq.deploy.tvm.vnni import int8_kernel
    from mmdet_regptq.deploy.onnx.verify import onnx_code_names, teacher_forced_codes
    from mmdet_regptq.quant import LLAQuantizer

    model, x = make_quantized(dict(w_bits=4, a_bits=4))
    llaq = LLAQuantizer(4, power_of_two=True, name='c3.weight')
    llaq.init_from(model.c3.float_weight('weight'))
    model.c3.replace_weight_quantizer(llaq)
    path = tmp_path / 'llaq.onnx'
    report = export_onnx(model, x, path, output_names=['feat', 'logits'])
    assert report.weights['c3.weight'] == (4, 'int8 shift') and not report.float_weights
    proto = onnx.load(str(path))
    codes = onnx_code_names(proto)
    ort = ort_run(proto, {'input': x.numpy()}, extra_outputs=list(codes.values()))
    lsb = teacher_forced_codes(model, (x,), {k: ort[v] for k, v in codes.items()})
    assert max(d.max_lsb for d in lsb) <= 1

    files, integer = build_artifact(proto, tmp_path / 'art')
    meta = json.loads(Path(files[2]).read_text())
    shift = [w for w in meta['weights'] if w['kind'] == 'shift']
    assert len(shift) == 1 and shift[0]['bits'] == 4 and shift[0]['shape'] == [8, 16, 1, 1]
    assert integer.layers['/c3/Conv_output_0'] == ('int8', 'int8 shift')
    kernel = meta['kernels'][shift[0]['name']]
    assert kernel == {'vnni': 'vnni_int8', 'avx2': 'avx2_int8',
                      'generic': 'float32_accumulate'}[int8_kernel(host_target())]
    out = TvmRunner(tmp_path / 'art')({'input': x})
    with torch.no_grad():
        ref = model(x)
    assert max_abs_diff(ref, [out['feat'], out['logits']]) < 1e-4

    # the side-by-side latency script reads the same artifact and names its shift layers
    tvm_artifacts = load_script('benchmarks/tvm_artifacts.py')
    capsys.readouterr()
    tvm_artifacts.main([str(tmp_path / 'art'), str(tmp_path / 'art'), '--runs', '2',
                        '--labels', 'a', 'b'])
    table = capsys.readouterr().out
    assert '| b |' in table and '1 int8 shift' in table and '| 1.' in table


def test_matmul_schedule_keeps_the_values_and_tiles_the_loops(single_thread):
    """A Linear layer (ONNX Gemm) gets the matmul schedule: same values as TVM's default
    lowering, loops parallel and vectorized."""
    import onnx
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from mmdet_regptq.deploy.tvm.build import compile_onnx, host_target
    from mmdet_regptq.deploy.tvm.schedule import schedule_cpu

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 200)).astype(np.float32)          # [N, K], transB
    graph = helper.make_graph(
        [helper.make_node('Gemm', ['x', 'w'], ['y'], transB=1)], 'fc',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [12, 200])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [12, 48])],
        [numpy_helper.from_array(weight, 'w')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    x = rng.standard_normal((12, 200)).astype(np.float32)
    outs = []
    for schedule in (False, True):
        exe = compile_onnx(model, {'x': [12, 200]}, schedule=schedule)
        vm = relax.VirtualMachine(exe, tvm.cpu())
        outs.append(vm['main'](tvm.runtime.tensor(x, tvm.cpu())).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(outs[1], x @ weight.T, rtol=1e-4, atol=1e-3)

    target = host_target()
    mod = from_onnx(model, shape_dict={'x': [12, 200]}, keep_params_in_input=False)
    with target:
        from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
        mod = tvm.transform.Sequential(cpu_generic.library_dispatch_passes(target)
                                       + cpu_generic.legalize_passes(target))(mod)
    text = schedule_cpu(mod).script()
    assert 'T.parallel' in text and 'T.vectorized' in text and 'matmul_local' in text


def test_conv_schedule_tiles_odd_channel_counts_exactly(single_thread):
    """A conv with 255 output channels (YOLO's head, 3 x 85) gets a 5-channel register tile,
    not 1, and the int32 results stay exact (the tile changes loops, not the sums)."""
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from mmdet_regptq.deploy.tvm.build import compile_onnx, extra_onnx_converters, host_target
    from mmdet_regptq.deploy.tvm.schedule import schedule_cpu

    rng = np.random.default_rng(0)
    weight = rng.integers(-8, 8, (255, 24, 3, 3), dtype=np.int8)
    x = rng.integers(-128, 128, (1, 24, 10, 12), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node('ConvInteger', ['x', 'w'], ['y'], pads=[1, 1, 1, 1])], 'head',
        [helper.make_tensor_value_info('x', TensorProto.INT8, list(x.shape))],
        [helper.make_tensor_value_info('y', TensorProto.INT32, [1, 255, 10, 12])],
        [numpy_helper.from_array(weight, 'w')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    exe = compile_onnx(model, {'x': list(x.shape)}, kernel='generic')
    out = relax.VirtualMachine(exe, tvm.cpu())['main'](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(),
                                     torch.from_numpy(weight).double(), padding=1)
    np.testing.assert_array_equal(out, ref.numpy().astype(np.int32))

    target = host_target()
    with extra_onnx_converters():
        mod = from_onnx(model, shape_dict={'x': list(x.shape)}, dtype_dict={'x': 'int8'},
                        keep_params_in_input=False)
    with target:
        from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
        mod = tvm.transform.Sequential(cpu_generic.library_dispatch_passes(target)
                                       + cpu_generic.legalize_passes(target))(mod)
    text = schedule_cpu(mod).script()
    # 255 channels / 5 x 10 rows in parallel, the 5-channel tile unrolled
    assert 'T.parallel(T.int64(510))' in text and 'T.unroll(T.int64(5))' in text
