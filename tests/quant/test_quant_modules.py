"""Quantized wrappers: weight sharing, switches, QDrop, MultiheadAttention equivalence."""
import pytest
import torch
from torch import nn

from mmdet_regptq.quant import (AdaRoundQuantizer, QuantConv2d, QuantLinear,
                                QuantMultiheadAttention, UniformQuantizer)


def _wrap(module, wrapper_cls, x, a_bits=4, w_bits=4):
    wrapper = wrapper_cls(module, UniformQuantizer(w_bits, per_channel=True),
                          UniformQuantizer(a_bits))
    wrapper.init_weight_quantizers()
    for q in wrapper.input_quantizers().values():
        q.init_from(x)
    return wrapper


@pytest.fixture
def conv_case():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    return conv, x, _wrap(conv, QuantConv2d, x)


def test_conv_wrapper_shares_weight_and_switches(conv_case):
    conv, x, qconv = conv_case
    assert qconv.module is conv and qconv.to_float() is conv
    assert qconv.module.weight is conv.weight
    assert qconv.out_channels == 4 and qconv.weight is conv.weight   # attribute fallback
    assert (qconv.w_bits, qconv.a_bits) == (4, 4)
    ref = conv(x)
    assert not torch.allclose(qconv(x), ref, atol=1e-3)
    qconv.set_quant(weight=False, input=False)
    assert torch.equal(qconv(x), ref)
    qconv.set_quant(weight=True)
    expected = nn.functional.conv2d(x, qconv.weight_quantizer(conv.weight), conv.bias, padding=1)
    assert torch.allclose(qconv(x), expected)


def test_linear_wrapper():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    qlin = _wrap(lin, QuantLinear, x, a_bits=8, w_bits=8)
    assert torch.allclose(qlin(x), lin(x), atol=0.05)
    qlin.set_quant(weight=False, input=False)
    assert torch.equal(qlin(x), lin(x))


def test_drop_prob(conv_case):
    conv, x, qconv = conv_case
    quantized = qconv(x)
    qconv.set_quant(input=False)
    fp_input = qconv(x)
    qconv.set_quant(input=True)
    qconv.train()
    qconv.drop_prob = 1.0
    assert torch.equal(qconv(x), fp_input)        # every input element keeps its FP value
    qconv.drop_prob = 0.0
    assert torch.equal(qconv(x), quantized)
    qconv.drop_prob = 0.5
    torch.manual_seed(0)
    mixed = qconv(x)
    assert not torch.equal(mixed, quantized) and not torch.equal(mixed, fp_input)
    qconv.eval()                                   # QDrop only in training mode
    assert torch.equal(qconv(x), quantized)
    with pytest.raises(ValueError, match='drop_prob'):
        qconv.drop_prob = 1.5


def test_forward_before_activation_init_raises():
    conv = nn.Conv2d(3, 4, 3)
    qconv = QuantConv2d(conv, UniformQuantizer(4, per_channel=True), UniformQuantizer(4))
    qconv.init_weight_quantizers()
    with pytest.raises(RuntimeError, match='UniformQuantizer'):
        qconv(torch.randn(1, 3, 5, 5))


def test_replace_weight_quantizer(conv_case):
    conv, x, qconv = conv_case
    before = qconv(x)
    qconv.replace_weight_quantizer(AdaRoundQuantizer)           # factory form
    assert isinstance(qconv.weight_quantizer, AdaRoundQuantizer)
    qconv.weight_quantizer.soft_targets = False
    assert torch.allclose(qconv(x), before, atol=1e-5)          # hard init = nearest
    new = UniformQuantizer(8, per_channel=True)
    new.init_from(conv.weight)
    qconv.replace_weight_quantizer(new)                          # built form
    assert qconv.weight_quantizer is new and qconv.w_bits == 8
    with pytest.raises(KeyError, match='slot'):
        qconv.replace_weight_quantizer(new, slot='nope')


MHA_CASES = [dict(batch_first=True), dict(batch_first=False),
             dict(batch_first=True, kdim=5, vdim=3), dict(batch_first=False, bias=False,
                                                          add_bias_kv=True)]


@pytest.mark.parametrize('cfg', MHA_CASES)
@pytest.mark.parametrize('training', [False, True])
def test_mha_equals_original_when_quant_off(cfg, training):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **cfg)
    qmha = QuantMultiheadAttention(mha, UniformQuantizer(4, per_channel=True),
                                   UniformQuantizer(4))
    qmha.init_weight_quantizers()
    qmha.set_quant(weight=False, input=False)
    mha.train(training)
    qmha.train(training)
    kdim, vdim = cfg.get('kdim', 8), cfg.get('vdim', 8)
    shape = (lambda n: (2, n)) if cfg['batch_first'] else (lambda n: (n, 2))
    q = torch.randn(*shape(4), 8)
    k = torch.randn(*shape(6), kdim)
    v = torch.randn(*shape(6), vdim)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, -2:] = True
    attn_mask = torch.zeros(4, 6)
    attn_mask[:, 0] = float('-inf')
    calls = [dict(), dict(key_padding_mask=kpm), dict(attn_mask=attn_mask, need_weights=False),
             dict(key_padding_mask=kpm, average_attn_weights=False)]
    for kwargs in calls:
        ref_out, ref_w = mha(q, k, v, **kwargs)
        out, w = qmha(q, k, v, **kwargs)
        assert torch.allclose(out, ref_out, atol=1e-6)
        assert (w is None) == (ref_w is None)
        if w is not None:
            assert torch.allclose(w, ref_w, atol=1e-6)
    if kdim == vdim == 8:                                        # self-attention, fast path
        with torch.no_grad():
            ref = mha(q, q, q)[0]
            assert torch.allclose(qmha(q, q, q)[0], ref, atol=1e-5)


def test_mha_slots_and_quantized_forward():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    qmha = _wrap(mha, QuantMultiheadAttention, x, a_bits=8, w_bits=8)
    assert set(qmha.weight_slots()) == {'in_proj_weight', 'out_proj.weight'}
    assert set(qmha.input_slots()) == {'query', 'key', 'value'}
    assert qmha.weight_quantizer.scale.shape == (24, 1)          # per output row
    assert qmha.out_weight_quantizer.scale.shape == (8, 1)
    assert qmha.key_quantizer is not qmha.input_quantizer
    ref = mha(x, x, x)[0]
    out = qmha(x, x, x)[0]
    assert not torch.equal(out, ref) and torch.allclose(out, ref, atol=0.05)
    qmha.replace_weight_quantizer(AdaRoundQuantizer)             # every weight slot
    assert all(isinstance(q, AdaRoundQuantizer) for q in qmha.weight_quantizers().values())
    separate = QuantMultiheadAttention(nn.MultiheadAttention(8, 2, kdim=4, vdim=3),
                                       UniformQuantizer(4, per_channel=True), None)
    assert set(separate.weight_slots()) == {'q_proj_weight', 'k_proj_weight', 'v_proj_weight',
                                            'out_proj.weight'}
    assert separate.a_bits is None and separate.key_quantizer is None


def test_inference_caches_the_quantized_weight_until_anything_it_depends_on_changes(
        conv_case):
    conv, x, qconv = conv_case
    with torch.no_grad():
        first = qconv.quantized_weight()
        assert qconv.quantized_weight() is first                   # cached
        expected = qconv(x)
        conv.weight.mul_(0.5)                                      # in place: version bump
        moved = qconv.quantized_weight()
        assert moved is not first
        assert torch.equal(moved, qconv.weight_quantizer(conv.weight))
        qconv.weight_quantizer.scale.data = qconv.weight_quantizer.scale.data * 2  # storage
        assert not torch.equal(qconv.quantized_weight(), moved)
        qconv.weight_quantizer.enabled = False                     # a switch
        assert torch.equal(qconv.quantized_weight(), conv.weight)
    qconv.weight_quantizer.enabled = True
    with torch.no_grad():
        cached = qconv.quantized_weight()
    with_grad = qconv.quantized_weight()                           # never cached with autograd
    assert with_grad is not cached and with_grad.requires_grad
    assert torch.equal(with_grad.detach(), cached)
    assert expected.shape == (2, 4, 5, 5)


def test_cached_weight_follows_an_adaround_switch():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    qconv = _wrap(conv, QuantConv2d, torch.randn(2, 3, 5, 5))
    qconv.replace_weight_quantizer(AdaRoundQuantizer)
    quantizer = qconv.weight_quantizer
    with torch.no_grad():
        soft = qconv.quantized_weight()
        quantizer.soft_targets = False
        hard = qconv.quantized_weight()
    assert hard is not soft
    assert torch.equal(hard, quantizer(conv.weight).detach())


def test_cache_weights_switch_turns_the_cache_off(conv_case, monkeypatch):
    _, _, qconv = conv_case
    monkeypatch.setattr(QuantConv2d, 'cache_weights', False)
    with torch.no_grad():
        assert qconv.quantized_weight() is not qconv.quantized_weight()
    monkeypatch.setattr(QuantConv2d, 'cache_weights', True)
    with torch.no_grad():
        assert qconv.quantized_weight() is qconv.quantized_weight()
