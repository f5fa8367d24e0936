"""benchmarks/tvm_profile.py: per-kernel times of a TVM artifact, grouped by kind, and the
interleaved latency beside ONNX Runtime."""
from __future__ import annotations

import csv

import onnx


def test_kind_of_names_our_kernels(load_script):
    prof = load_script('benchmarks/tvm_profile.py')
    assert prof.kind_of('conv_vnni_u8z2_n1_c16_k32_320x320_3x3') == 'vnni_conv'
    assert prof.kind_of('fused_conv2d_add14') == 'conv (generic)'
    assert prof.kind_of('fused_cast3_multiply3_add2_tir_sigmoid1_multiply4') == 'rescale+SiLU'
    assert prof.kind_of('fused_concatenate1') == 'concat'
    assert prof.kind_of('vm.builtin.alloc_storage') == 'vm builtin'
    assert prof.kind_of('fused_add_clip') == 'elementwise'


def test_profile_of_a_silu_artifact(tmp_path, load_script, capsys, single_thread):
    from onnx import TensorProto, helper

    from mmdet_regptq.deploy.tvm.build import build_artifact

    shape = [1, 4, 8, 8]
    graph = helper.make_graph(
        [helper.make_node('Sigmoid', ['input'], ['s']),
         helper.make_node('Mul', ['input', 's'], ['out'])], 'silu',
        [helper.make_tensor_value_info('input', TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info('out', TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    onnx.save(model, str(tmp_path / 'silu.onnx'))
    build_artifact(model, tmp_path / 'art', integer=False)
    prof = load_script('benchmarks/tvm_profile.py')
    capsys.readouterr()
    assert prof.main([str(tmp_path / 'art'), '--ort', str(tmp_path / 'silu.onnx'),
                      '--runs', '2', '--csv', str(tmp_path / 'k.csv')]) == 0
    out = capsys.readouterr().out
    assert 'AVX-512 VNNI' in out and 'ort ' in out and 'tvm ' in out
    rows = list(csv.DictReader(open(tmp_path / 'k.csv')))
    assert any(r['kind'] == 'rescale+SiLU' and int(r['calls']) == 1 for r in rows)
    assert all(float(r['ms']) >= 0 for r in rows)
