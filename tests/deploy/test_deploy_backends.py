"""Backend graphs: ONNX Runtime INT8, the integer graph + bit-packed weights, TensorRT rules,
and the MMDeploy plugin registration."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mmdet_regptq.deploy import (check_tensorrt_qdq, export_onnx, make_ort_int8,
                                 to_integer_graph)
from mmdet_regptq.deploy.tvm.packed import unpack_weight
from mmdet_regptq.deploy.onnx.verify import max_abs_diff, ort_run
from mmdet_regptq.quant import pack_int

from deploy_toy import ResidualNet, make_quantized


def test_ort_int8_graph(w4a4):
    model, x, path, _ = w4a4
    proto = onnx.load(str(path))
    fused, report = make_ort_int8(proto, [{'input': x.numpy()}])
    onnx.checker.check_model(fused, full_check=True)
    # c1 -> ReLU -> c2's quantizer only: already ends in our Q. c2 (ReLU feeds c3 and the
    # residual), c3 (residual add) and fc (graph output) get an 8-bit output Q/DQ.
    assert len(report.fused) == 1 and len(report.requantized) == 3
    assert len(report.recentred) == 3          # the 4-bit weights: int8, zero point 0
    out = ort_run(fused, {'input': x.numpy()})
    with torch.no_grad():
        ref = model(x)
    diff = max_abs_diff(ref, [out['feat'], out['logits']])
    scale = max(float(r.abs().max()) for r in ref)
    print(f'ORT INT8 vs fake-quant: max |diff| = {diff:.3g} (outputs up to {scale:.3g})')
    assert diff < 0.05 * scale


def test_ort_int8_runs_residual_and_fpn_adds_in_integers(single_thread, tmp_path):
    """W8A8 residual block + FPN top-down add: every add becomes ``DQ, DQ -> Add -> Q``,
    ORT fuses them into QLinearAdd, and the output stays within a few 8-bit steps."""
    import onnxruntime as ort

    model, x = make_quantized(dict(w_bits=8, a_bits=8), net=ResidualNet)
    path = tmp_path / 'residual.onnx'
    export_onnx(model, x, path, output_names=['out'])
    fused, report = make_ort_int8(onnx.load(str(path)), [{'input': x.numpy()}])
    assert len(report.integer_adds) == 2, report.summary()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / 'opt.onnx')
    ort.InferenceSession(fused.SerializeToString(), options, providers=['CPUExecutionProvider'])
    ops = [n.op_type for n in onnx.load(str(tmp_path / 'opt.onnx')).graph.node]
    assert ops.count('QLinearAdd') == 2 and 'Add' not in ops and 'Relu' not in ops, ops
    out = ort_run(fused, {'input': x.numpy()})['out']
    with torch.no_grad():
        ref = model(x).numpy()
    diff = float(np.abs(out - ref).max())
    print(f'ORT INT8 with integer adds vs fake-quant: max |diff| = {diff:.3g} '
          f'(outputs up to {np.abs(ref).max():.3g})')
    assert diff < 0.05 * float(np.abs(ref).max())


def test_ort_profile_sums_kernel_times_per_op_type_and_node(single_thread, tmp_path):
    """benchmarks/deploy.py --ort-profile: the fused INT8 graph's kernel time is mostly in
    QLinearConv; per-op and per-node sums agree with the total; the warm-up is dropped."""
    from mmdet_regptq.deploy.onnx.ort_profile import profile_ort, random_feeds, summarize

    model, x = make_quantized(dict(w_bits=8, a_bits=8), net=ResidualNet)
    path = tmp_path / 'residual.onnx'
    export_onnx(model, x, path, output_names=['out'])
    fused, _ = make_ort_int8(onnx.load(str(path)), [{'input': x.numpy()}])
    onnx.save(fused, str(tmp_path / 'fused.onnx'))
    feeds = random_feeds(tmp_path / 'fused.onnx')
    assert feeds['input'].shape == tuple(x.shape) and feeds['input'].dtype == np.float32
    prof = profile_ort(tmp_path / 'fused.onnx', runs=3)
    ops = {r['op_type']: r for r in prof.op_types}
    assert 'QLinearConv' in ops and 'Conv' not in ops, ops
    assert sum(r['ms'] for r in prof.op_types) == pytest.approx(prof.total_ms, abs=1e-2)
    assert sum(r['nodes'] for r in prof.op_types) == len(prof.nodes)
    assert prof.nodes[0]['ms'] >= prof.nodes[-1]['ms'] and prof.total_ms > 0
    # two runs of 1 ms each after a 50 ms warm-up: 1 ms per run, the warm-up left out
    events = [dict(name='model_run', cat='Session', ts=0, dur=60),
              dict(name='a_kernel_time', cat='Node', ts=10, dur=50_000,
                   args=dict(op_name='Conv')),
              dict(name='model_run', cat='Session', ts=100, dur=10),
              dict(name='a_kernel_time', cat='Node', ts=101, dur=1_000,
                   args=dict(op_name='Conv')),
              dict(name='model_run', cat='Session', ts=200, dur=10),
              dict(name='a_kernel_time', cat='Node', ts=201, dur=1_000,
                   args=dict(op_name='Conv'))]
    assert summarize(events, runs=2).op_types == [dict(op_type='Conv', ms=1.0, nodes=1,
                                                       share=1.0)]
    with pytest.raises(ValueError, match='model_run'):
        summarize(events, runs=3)


def test_integer_graph_and_packing(single_thread, tmp_path):
    model, x = make_quantized(dict(w_bits=4, a_bits=4, first_layer=None))
    path = tmp_path / 'allint4.onnx'
    export_onnx(model, x, path, output_names=['feat', 'logits'])
    graph, report = to_integer_graph(onnx.load(str(path)))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count('ConvInteger') == 3 and ops.count('MatMulInteger') == 1
    assert 'Conv' not in ops and 'Gemm' not in ops
    assert set(report.layers.values()) == {('int8', 'int8')}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    for name, packed in report.weights.items():
        assert packed.bits == 4
        words = pack_int(torch.from_numpy(packed.codes), 4, signed=packed.signed)
        assert words.numel() == -(-packed.codes.size // 8)             # 8 codes per int32
        meta = dict(bits=4, shape=list(packed.codes.shape), signed=packed.signed,
                    qmin=packed.qmin, qmax=packed.qmax, centred=packed.centred,
                    transpose=packed.transpose)
        rebuilt = unpack_weight(words.numpy(), packed.zero_point, meta)
        np.testing.assert_array_equal(rebuilt, inits[name])
    # ORT runs ConvInteger/MatMulInteger on int8 x int8 with scalar zero points
    out = ort_run(graph, {'input': x.numpy()})
    with torch.no_grad():
        ref = model(x)
    diff = max_abs_diff(ref, [out['feat'], out['logits']])
    print(f'integer graph (ORT) vs fake-quant: max |diff| = {diff:.3g}')
    assert diff < 1e-4


def test_tensorrt_rules(single_thread, tmp_path):
    sym = dict(type='Uniform', symmetric=True, scale_method='minmax')
    model, x = make_quantized(dict(w_bits=8, a_bits=8, weight=dict(sym, per_channel=True),
                                   act=dict(sym, per_channel=False)))
    path = tmp_path / 'trt.onnx'
    export_onnx(model, x, path, int4_weights=False, opset=17)
    check = check_tensorrt_qdq(onnx.load(str(path)))
    assert check.ok, check.errors
    assert check.int8_layers == 4 and check.activations == 4
    # the default asymmetric 4-bit export breaks the rules (uint8, zero points, Clip)
    model, x = make_quantized(dict(w_bits=4, a_bits=4))
    export_onnx(model, x, tmp_path / 'asym.onnx')
    bad = check_tensorrt_qdq(onnx.load(str(tmp_path / 'asym.onnx')))
    assert not bad.ok
    text = '\n'.join(bad.errors)
    assert 'zero point must be 0' in text and 'Q directly followed by DQ' in text


def test_mmdeploy_registration():
    from mmdeploy.backend.base import BACKEND_MANAGERS, BACKEND_WRAPPER, get_backend_manager
    from mmdeploy.codebase.mmdet.deploy import object_detection_model as odm
    from mmdeploy.utils import Backend

    from mmdet_regptq.deploy import mmdeploy as mmdeploy_plugin
    from mmdet_regptq.deploy.mmdeploy.options import regptq_options

    manager = BACKEND_MANAGERS.find('tvm_int4')
    assert manager is mmdeploy_plugin.TVMInt4Manager
    assert get_backend_manager(Backend.TVM_INT4) is manager
    assert Backend.TVM_INT4.value == 'tvm_int4' and Backend.TVM_RELAX.value == 'tvm_relax'
    assert manager.is_available() and manager.get_version().startswith('0.')
    assert BACKEND_WRAPPER.get('tvm_int4') is mmdeploy_plugin.TVMRelaxWrapper
    assert getattr(odm, '__BACKEND_MODEL').get('regptq_raw') is mmdeploy_plugin.RawOutputDetector
    assert regptq_options({})['onnx_format'] == 'qdq'
    with pytest.raises(KeyError, match='allowed'):
        regptq_options({'regptq': {'int4': True}})


def _two_tower_graph() -> onnx.ModelProto:
    """x -> Q/DQ -> Conv (int8 weight) -> two equal QuantizeLinear (two head towers).

    ``|w| <= 64``: ORT's u8 x s8 kernel is exact on every x86 CPU (ort_int8.SAFE_U8S8)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-64, 65, (8, 4, 3, 3)).astype(np.int8), 'w'),
             numpy_helper.from_array(np.full(8, 0.01, np.float32), 'w.s'),
             numpy_helper.from_array(np.zeros(8, np.int8), 'w.z'),
             numpy_helper.from_array(np.array(0.02, np.float32), 'x.s'),
             numpy_helper.from_array(np.array(128, np.uint8), 'x.z')]
    for tower in ('cls', 'reg'):
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), f'{tower}.s'),
                  numpy_helper.from_array(np.array(120, np.uint8), f'{tower}.z')]
    nodes = [helper.make_node('QuantizeLinear', ['x', 'x.s', 'x.z'], ['xq']),
             helper.make_node('DequantizeLinear', ['xq', 'x.s', 'x.z'], ['xd']),
             helper.make_node('DequantizeLinear', ['w', 'w.s', 'w.z'], ['wd'], axis=0),
             helper.make_node('Conv', ['xd', 'wd'], ['y'], pads=[1, 1, 1, 1], name='conv')]
    outputs = []
    for tower in ('cls', 'reg'):
        nodes += [helper.make_node('QuantizeLinear', ['y', f'{tower}.s', f'{tower}.z'],
                                   [f'{tower}.q']),
                  helper.make_node('DequantizeLinear', [f'{tower}.q', f'{tower}.s',
                                                        f'{tower}.z'], [tower])]
        outputs.append(helper.make_tensor_value_info(tower, TensorProto.FLOAT, [1, 8, 8, 8]))
    graph = helper.make_graph(nodes, 'towers', [helper.make_tensor_value_info(
        'x', TensorProto.FLOAT, [1, 4, 8, 8])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])


def test_equal_quantizers_of_one_tensor_are_merged_for_qlinearconv(tmp_path):
    """An FPN output feeds two head towers with equal input quantizers: merging the two
    QuantizeLinear nodes lets ORT fuse the conv into QLinearConv; values are unchanged."""
    import onnxruntime as ort

    from mmdet_regptq.deploy.onnx.ort_int8 import merge_duplicate_quantizers

    def fused_ops(model: onnx.ModelProto) -> list[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / 'opt.onnx')
        ort.InferenceSession(model.SerializeToString(), options,
                             providers=['CPUExecutionProvider'])
        return [n.op_type for n in onnx.load(str(tmp_path / 'opt.onnx')).graph.node]

    model = _two_tower_graph()
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    before = ort_run(model, {'x': x}, optimize=False)
    assert 'QLinearConv' not in fused_ops(model)
    merged = onnx.ModelProto()
    merged.CopyFrom(model)
    assert merge_duplicate_quantizers(merged) == 1
    onnx.checker.check_model(merged, full_check=True)
    after = ort_run(merged, {'x': x}, optimize=False)
    fused = ort_run(merged, {'x': x})                    # QLinearConv: integer accumulation
    for name in ('cls', 'reg'):
        np.testing.assert_array_equal(before[name], after[name])      # the merge is exact
        assert np.abs(fused[name] - before[name]).max() <= 0.05 + 1e-6  # <= 1 LSB (0.05)
    assert 'QLinearConv' in fused_ops(merged)
    # different parameters are kept apart
    other = _two_tower_graph()
    for init in other.graph.initializer:
        if init.name == 'reg.s':
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(0.07, np.float32), 'reg.s'))
    assert merge_duplicate_quantizers(other) == 0


def test_u8s8_saturates_reads_the_cpus_vnni_flag(tmp_path, monkeypatch):
    import platform

    from mmdet_regptq.deploy.onnx.ort_int8 import u8s8_saturates

    monkeypatch.setattr(platform, 'machine', lambda: 'x86_64')
    for flags, saturates in (('fpu avx avx2', True), ('avx2 avx512f avx512_vnni', False),
                             ('avx2 avx_vnni', False)):
        info = tmp_path / 'cpuinfo'
        info.write_text(f'processor\t: 0\nflags\t\t: {flags}\n')
        assert u8s8_saturates(str(info)) is saturates, flags
    assert u8s8_saturates(str(tmp_path / 'missing')) is True       # unknown: the safe side
    monkeypatch.setattr(platform, 'machine', lambda: 'aarch64')
    assert u8s8_saturates(str(tmp_path / 'missing')) is False


def test_ort_int8_keeps_wide_weights_uint8_where_u8s8_would_saturate(single_thread, tmp_path):
    """W8A8 with symmetric weights (``|q - z|`` up to 127, int8-able): for
    ``target_cpu='avx2'`` they stay uint8 (ORT's exact u8 x u8 kernel) and the fused
    graph matches the fake-quant model on any x86 CPU; for ``'vnni'`` they become int8. 4-bit
    weights (``|q - z| <= 15``) become int8 with zero point 0 either way."""
    symmetric = dict(type='Uniform', per_channel=True, symmetric=True, scale_method='minmax')
    model, x = make_quantized(dict(w_bits=8, a_bits=8, weight=symmetric), net=ResidualNet)
    with torch.no_grad():
        ref = model(x).numpy()
    export_onnx(model, x, tmp_path / 'w8.onnx', output_names=['out'])
    proto = onnx.load(str(tmp_path / 'w8.onnx'))
    feeds = [{'input': x.numpy()}]
    _, plain = make_ort_int8(proto, feeds, target_cpu='vnni')
    assert plain.recentred and not plain.widened, plain.summary()
    fused, report = make_ort_int8(proto, feeds, target_cpu='avx2')
    assert sorted(report.widened) == sorted(plain.recentred), report.summary()
    inits = {i.name: i for i in fused.graph.initializer}
    for name in report.widened:
        assert inits[name].data_type == onnx.TensorProto.UINT8
    out = ort_run(fused, {'input': x.numpy()})['out']
    diff = float(np.abs(out - ref).max())
    print(f'W8A8 ORT INT8 (uint8 weights) vs fake-quant: max |diff| = {diff:.3g}')
    assert diff < 0.05 * float(np.abs(ref).max())
    model4, x4 = make_quantized(dict(w_bits=4, a_bits=8, first_layer_bits=None,
                                     weight=symmetric), net=ResidualNet)
    export_onnx(model4, x4, tmp_path / 'w4.onnx', output_names=['out'])
    _, report4 = make_ort_int8(onnx.load(str(tmp_path / 'w4.onnx')), [{'input': x4.numpy()}],
                               target_cpu='avx2')
    assert len(report4.recentred) == len(plain.recentred) and not report4.widened, \
        report4.summary()
