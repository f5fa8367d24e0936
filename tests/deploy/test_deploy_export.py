"""ONNX Q/DQ export: checker, INT4 initializers, numerics vs the fake-quant model."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from mmdet_regptq.deploy import export_mode, export_onnx
from mmdet_regptq.deploy.onnx.verify import (max_abs_diff, onnx_code_names, ort_run,
                                             teacher_forced_codes, torch_codes)

from deploy_toy import make_quantized


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def test_export_passes_checker_and_uses_int4(w4a4):
    model, x, path, report = w4a4
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert not [n for n in proto.graph.node if n.domain]            # no custom op left
    inits = _inits(proto)
    assert inits['c1.weight.int'].data_type == TensorProto.UINT8    # 8-bit first layer
    for name in ('c2', 'c3', 'fc'):
        assert inits[f'{name}.weight.int'].data_type == TensorProto.UINT4
        assert inits[f'{name}.weight.zero_point'].data_type == TensorProto.UINT4
    assert report.weights['c2.weight'] == (4, 'uint4')
    for node in proto.graph.node:
        if node.op_type == 'DequantizeLinear' and node.input[0].endswith('weight.int'):
            axis = [a.i for a in node.attribute if a.name == 'axis']
            assert axis == [0]                                      # per output channel
            assert numpy_helper.to_array(inits[node.input[1]]).ndim == 1
        if node.op_type == 'QuantizeLinear':                        # activations per tensor
            assert numpy_helper.to_array(inits[node.input[1]]).ndim == 0
    assert any(n.op_type == 'Clip' for n in proto.graph.node)       # 4-bit grid in uint8


def test_int4_initializer_round_trips(w4a4):
    model, _, path, _ = w4a4
    inits = _inits(onnx.load(str(path)))
    for name in ('c2', 'c3', 'fc'):
        layer = getattr(model, name)
        codes = layer.weight_quantizer.to_int(layer.module.weight.detach()).numpy()
        stored = numpy_helper.to_array(inits[f'{name}.weight.int']).astype(np.int64)
        np.testing.assert_array_equal(stored, codes)
        scale = numpy_helper.to_array(inits[f'{name}.weight.scale'])
        zp = numpy_helper.to_array(inits[f'{name}.weight.zero_point']).astype(np.int64)
        shape = [-1] + [1] * (codes.ndim - 1)
        dq = (stored - zp.reshape(shape)) * scale.reshape(shape)
        np.testing.assert_allclose(dq, layer.quantized_weight().detach().numpy(), atol=1e-6)


def test_ort_matches_fake_quant(w4a4):
    model, x, path, _ = w4a4
    proto = onnx.load(str(path))
    codes = onnx_code_names(proto)
    out = ort_run(proto, {'input': x.numpy()}, extra_outputs=list(codes.values()))
    with torch.no_grad():
        ref = model(x)
    diff = max_abs_diff(ref, [out['feat'], out['logits']])
    lsb = teacher_forced_codes(model, (x,), {k: out[v] for k, v in codes.items()})
    print(f'ORT vs PyTorch fake-quant: max |diff| = {diff:.3g}; per quantized tensor '
          f'(teacher-forced) max {max(d.max_lsb for d in lsb)} LSB, at most '
          f'{max(d.mismatch for d in lsb):.2%} of the codes differ')
    # ORT rounds x / s, PyTorch x * (1 / s), and sums conv products in another order: a
    # code at a rounding boundary may differ by one LSB, which moves the outputs it feeds.
    assert len(lsb) == 4 and max(d.max_lsb for d in lsb) <= 1
    assert max(d.mismatch for d in lsb) < 0.01
    assert diff < 0.1 * max(float(r.abs().max()) for r in ref)


def test_export_mode_is_exact_and_restored(single_thread):
    model, x = make_quantized(dict(w_bits=3, a_bits=4))
    with torch.no_grad():
        ref = model(x)
        with export_mode(model) as report:
            inside = model(x)
            assert 'forward' in model.c2.weight_quantizer.__dict__
        after = model(x)
    assert 'forward' not in model.c2.weight_quantizer.__dict__
    assert len(report.float_weights) == 0
    for a, b, c in zip(ref, inside, after):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_int8_carriers_without_int4(tmp_path, single_thread):
    model, x = make_quantized(dict(w_bits=4, a_bits=8, first_layer_bits=None))
    path = tmp_path / 'int8.onnx'
    export_onnx(model, x, path, int4_weights=False, opset=17, output_names=['feat', 'logits'])
    proto = onnx.load(str(path))
    inits = _inits(proto)
    assert inits['c2.weight.int'].data_type == TensorProto.UINT8
    assert not any(n.op_type == 'Clip' for n in proto.graph.node)     # full 8-bit grids
    codes = onnx_code_names(proto)
    out = ort_run(proto, {'input': x.numpy()}, extra_outputs=list(codes.values()))
    lsb = teacher_forced_codes(model, (x,), {k: out[v] for k, v in codes.items()})
    assert max(d.max_lsb for d in lsb) <= 1


def test_torch_codes_key_every_quantized_tensor_as_the_export(w4a4):
    model, x, path, _ = w4a4
    codes = torch_codes(model, (x,))
    assert set(codes) == set(onnx_code_names(onnx.load(str(path))))
    assert all(c.dtype.kind in 'iu' for c in codes.values())
    # forcing the model's own codes back in changes none of them
    lsb = teacher_forced_codes(model, (x,), codes)
    assert len(lsb) == len(codes) and max(d.max_lsb for d in lsb) == 0
