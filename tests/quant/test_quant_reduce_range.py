"""``w_reduce_range``: 8-bit weight grids narrowed to ``-64..64`` (ONNX Runtime's
``reduce_range``) in the fake-quant quantizer itself, so calibration, AP and the export
all see the codes that AVX2's u8 x s8 kernel computes exactly."""
import pytest
import torch
from torch import nn

from mmdet_regptq.quant import (AdaRoundQuantizer, QuantPolicy, UniformQuantizer,
                                init_activation_quantizers, iter_quant_modules, quantize_model)


def test_uniform_reduce_range_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    q = UniformQuantizer(8, symmetric=True, reduce_range=True, per_channel=True,
                         scale_method='minmax')
    assert q.quant_range == (-64, 64)
    q.init_from(w)
    codes = q.to_int(w)
    assert int(codes.abs().max()) == 64                    # min/max reaches the grid's end
    assert torch.equal(q.zero_point, torch.zeros_like(q.zero_point))
    # the fake-quantized weight is s * q with those codes
    assert torch.allclose(q(w), codes.float() * q.scale, atol=1e-7)
    full = UniformQuantizer(8, symmetric=True, per_channel=True, scale_method='minmax')
    full.init_from(w)
    assert full.quant_range == (-128, 127)
    # half the levels: about twice the error of the full symmetric grid
    with torch.no_grad():
        err_rr, err_full = (q(w) - w).abs().mean(), (full(w) - w).abs().mean()
    assert 1.5 < float(err_rr / err_full) < 2.5
    assert 'reduce_range' in repr(q)


@pytest.mark.parametrize('kwargs, match', [
    (dict(reduce_range=True), r'reduce_range=True needs symmetric=True'),
    (dict(reduce_range=True, symmetric=True, bits=2), r'bits >= 3'),
    (dict(reduce_range=1, symmetric=True), r'reduce_range=1 is invalid; allowed True/False'),
])
def test_uniform_reduce_range_errors(kwargs, match):
    kwargs = dict(dict(bits=8), **kwargs)
    with pytest.raises(ValueError, match=match):
        UniformQuantizer(**kwargs)


def test_adaround_keeps_the_reduced_grid():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 3, 3)
    base = UniformQuantizer(8, symmetric=True, reduce_range=True, per_channel=True)
    base.init_from(w)
    ada = AdaRoundQuantizer(base, w)
    assert ada.quant_range == (-64, 64)
    ada.alpha.data.fill_(10.0)                          # round every weight up
    assert int(ada.to_int(w).abs().max()) <= 64


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))))


def _quantized(**quant) -> nn.Module:
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(2, 3, 12, 12)
    quantize_model(model, dict(fold_bn=False, **quant), example_forward=lambda m: m(x))
    init_activation_quantizers(model, lambda: model(x))
    return model


def test_policy_reduces_8_bit_weights_only():
    # W4A4, first layer 8 bit: only the first layer's grid changes
    model = _quantized(w_bits=4, a_bits=4, w_reduce_range=True)
    ranges = {name: m.weight_quantizer.quant_range for name, m in iter_quant_modules(model)}
    assert ranges == {'stem': (-64, 64), 'body': (0, 15), 'head': (0, 15)}
    model = _quantized(w_bits=8, a_bits=8, w_reduce_range=True,
                       overrides={'head': dict(w_bits=6)})
    for name, layer in iter_quant_modules(model):
        q = layer.weight_quantizer
        codes = q.to_int(layer.module.weight.detach())
        if name == 'head':
            assert q.quant_range == (0, 63) and not q.symmetric
        else:
            assert q.quant_range == (-64, 64) and q.symmetric
            assert int(codes.abs().max()) <= 64
    # without the option the default asymmetric 8-bit grid stays
    plain = _quantized(w_bits=8, a_bits=8)
    assert plain.body.weight_quantizer.quant_range == (0, 255)


def test_policy_option_is_validated_when_the_config_is_read():
    assert QuantPolicy.from_cfg(dict(w_bits=8, w_reduce_range=True)).w_reduce_range
    assert not QuantPolicy().w_reduce_range
    with pytest.raises(ValueError, match=r"w_reduce_range='yes' is invalid; allowed True/False"):
        QuantPolicy.from_cfg(dict(w_reduce_range='yes'))
    with pytest.raises(ValueError, match=r"w_reduce_range=True needs weight=dict\(type='Uniform'"):
        QuantPolicy.from_cfg(dict(w_reduce_range=True, weight=dict(type='LLAQ')))
    cfg = QuantPolicy.from_cfg(dict(w_bits=8, w_reduce_range=True)).weight_cfg(8)
    assert cfg['symmetric'] and cfg['reduce_range'] and cfg['bits'] == 8


def test_hook_checks_the_option_at_construction():
    from mmdet_regptq.engine import RegPTQHook

    RegPTQHook(quant=dict(w_bits=8, a_bits=8, w_reduce_range=True))
    with pytest.raises(ValueError, match=r'w_reduce_range=None is invalid'):
        RegPTQHook(quant=dict(w_bits=8, a_bits=8, w_reduce_range=None))
