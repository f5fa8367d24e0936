"""LLAQuantizer: beats uniform on Laplace weights, gradients, exact integer form, state."""
import pytest
import torch

from mmdet_regptq.quant import (SEARCH_K, LLAQCodes, LLAQuantizer, QuantConv2d,
                                UniformQuantizer, pack_int, unpack_int)
from mmdet_regptq.registry import QUANTIZERS, build_from


def _laplace(shape=(16, 8, 3, 3), scale=0.02, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(*shape, generator=gen) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


def _mse(q, w):
    return ((q(w) - w) ** 2).mean().item()


def _best_uniform_mse(w, bits):
    """Best of the per-channel uniform quantizers with a range search (Lp / MSE)."""
    errors = []
    for symmetric in (False, True):
        for method, p in (('lp', 2.4), ('mse', 2.0)):
            q = UniformQuantizer(bits, symmetric=symmetric, per_channel=True,
                                 scale_method=method, p=p)
            q.init_from(w)
            errors.append(_mse(q, w))
    return min(errors)


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_lower_mse_than_best_uniform_on_laplace(bits):
    w = _laplace()
    llaq = LLAQuantizer(bits, k_candidates=SEARCH_K)
    llaq.init_from(w)
    assert _mse(llaq, w) < 0.85 * _best_uniform_mse(w, bits) if bits > 2 else \
        _mse(llaq, w) < _best_uniform_mse(w, bits)


def test_default_init_k1_searches_only_a():
    """The paper-derived default (k = 1, grid search of a) wins at 3 bits, not at 4."""
    w = _laplace()
    q3, q4 = LLAQuantizer(3), LLAQuantizer(4)
    q3.init_from(w)
    q4.init_from(w)
    assert torch.all(q3.k_pos == 1) and torch.all(q4.k_neg == 1)
    assert _mse(q3, w) < _best_uniform_mse(w, 3)
    assert _mse(q4, w) > _best_uniform_mse(w, 4)   # documented: k must grow at 4 bits


@pytest.mark.parametrize('bits', range(2, 9))
def test_integer_form_reproduces_fake_quant_exactly(bits):
    w = _laplace(seed=bits)
    q = LLAQuantizer(bits, k_candidates=(1.0, 1.5, 3.0))
    q.init_from(w)
    with torch.no_grad():   # a trained state: arbitrary k, a
        q.k_pos.mul_(1.3)
        q.a_neg.add_(0.37)
    fake = q(w)
    codes = q.to_int(w)
    assert isinstance(codes, LLAQCodes)
    assert codes.sign.dtype == torch.int8 and codes.level.dtype == torch.int32
    assert codes.scale.shape == (2, 16, 1, 1, 1) and codes.top == q.top
    assert torch.equal(LLAQuantizer.from_int(codes), fake)          # bit for bit
    assert torch.equal(q.fake_quant_export(w), fake)
    lo, hi = q.quant_range
    assert (lo, hi) == (-2 ** (bits - 1), 2 ** (bits - 1) - 1)
    signed = q.to_codes(w)
    assert signed.min() >= lo and signed.max() <= hi
    assert (codes.level[codes.sign > 0] <= q.top[0]).all()
    assert (codes.level[codes.sign < 0] <= q.top[1]).all()
    packed = pack_int(signed.flatten(), bits, signed=True)          # fits b bits
    assert torch.equal(unpack_int(packed, bits, signed.shape, signed=True), signed)


def test_k1_levels_are_shifts_of_the_top_level():
    w = _laplace()
    q = LLAQuantizer(4)
    q.init_from(w)
    codes = q.to_int(w)
    values = LLAQuantizer.from_int(codes._replace(mu=torch.zeros_like(codes.mu)))
    for side, sign in ((0, 1), (1, -1)):
        top = codes.scale[side].expand_as(w)
        pick = (codes.sign == sign) & (codes.level > 0)
        shifted = top[pick] * torch.exp2(codes.level[pick].float() - q.top[side])
        assert torch.equal(values[pick], sign * shifted)            # S * 2^-(L - level)
    zero = codes.level == 0
    assert zero.any() and torch.equal(values[zero], torch.zeros_like(values[zero]))


def test_zero_level_and_centre_are_exact():
    w = _laplace()
    q = LLAQuantizer(2)
    q.init_from(w)
    out = q(w)
    mu = q.mu.expand_as(w)
    assert ((out == mu).sum(dim=(1, 2, 3)) >= 1).all()              # median element → mu
    assert torch.equal(q.mu.flatten(), w.flatten(1).median(dim=1).values)
    assert len(torch.unique(q.to_codes(w))) <= 4


def test_gradients_reach_k_and_a():
    w = _laplace()
    q = LLAQuantizer(3, k_candidates=SEARCH_K)
    q.init_from(w)
    x = w.clone().requires_grad_(True)
    ((q(x) - w) ** 2).sum().backward()
    for name in ('k_pos', 'a_pos', 'k_neg', 'a_neg'):
        grad = getattr(q, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_training_k_and_a_lowers_the_error():
    w = _laplace()
    q = LLAQuantizer(4)                                             # k = 1 start
    q.init_from(w)
    before = _mse(q, w)
    opt = torch.optim.Adam([q.k_pos, q.a_pos, q.k_neg, q.a_neg], lr=2e-2)
    for _ in range(150):
        opt.zero_grad()
        ((q(w) - w) ** 2).mean().backward()
        opt.step()
    assert _mse(q, w) < 0.7 * before


def test_per_tensor_registry_state_dict_and_errors():
    w = _laplace()
    q = build_from(QUANTIZERS, dict(type='LLAQ', bits=3, per_channel=False), 'weight')
    assert isinstance(q, LLAQuantizer)
    with pytest.raises(RuntimeError, match='before init_from'):
        q(w)
    q.init_from(w)
    assert q.k_pos.dim() == 0 and q.mu.dim() == 0
    fresh = LLAQuantizer(3, per_channel=False)
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_initialized() and torch.equal(fresh(w), q(w))
    per_channel = LLAQuantizer(3)
    per_channel.init_from(w)
    fresh = LLAQuantizer(3)
    fresh.load_state_dict(per_channel.state_dict())                 # lazy shapes resized
    assert torch.equal(fresh(w), per_channel(w))
    with pytest.raises(ValueError, match='bits=9'):
        LLAQuantizer(9)
    with pytest.raises(ValueError, match='k_candidates'):
        LLAQuantizer(4, k_candidates=())


def test_in_a_conv_wrapper():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(_laplace())
    wrapper = QuantConv2d(conv)
    wrapper.replace_weight_quantizer(LLAQuantizer(4, k_candidates=SEARCH_K))
    wrapper.weight_quantizer.init_from(conv.weight.detach())
    x = torch.randn(2, 8, 5, 5)
    out = wrapper(x)
    ref = torch.nn.functional.conv2d(x, wrapper.quantized_weight(), conv.bias, padding=1)
    assert torch.equal(out, ref) and torch.isfinite(out).all()


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_sorted_search_matches_dense_search(bits):
    """The prefix-sum search (search_p=2) picks grids as good as the dense error scan."""
    torch.manual_seed(1)
    w = torch.distributions.Laplace(0.0, 0.02).sample((16, 8, 3, 3))
    fast = LLAQuantizer(bits, k_candidates=SEARCH_K)
    dense = LLAQuantizer(bits, k_candidates=SEARCH_K, search_p=2.0 + 1e-9)  # dense path
    fast.init_from(w)
    dense.init_from(w)
    err_fast = (fast(w) - w).square().mean()
    err_dense = (dense(w) - w).square().mean()
    assert err_fast <= err_dense * 1.001


@pytest.mark.parametrize('bits', [2, 3, 4])
@pytest.mark.parametrize('per_channel', [True, False])
def test_power_of_two_shift_form_is_exact(bits, per_channel):
    w = _laplace(seed=bits)
    q = LLAQuantizer(bits, per_channel=per_channel, power_of_two=True,
                     k_candidates=SEARCH_K)          # power_of_two overrides the k search
    q.init_from(w)
    assert q.k_candidates == (1.0,) and not q.k_pos.requires_grad and q.a_pos.requires_grad
    form = q.shift_form(w)
    assert form is not None and form.pos.dtype == torch.int8
    # every nonzero entry is +-2^e (a shift), within int8, on its own side
    mag = torch.where(form.pos != 0, form.pos.long(), -form.neg.long())
    assert torch.all((mag & (mag - 1)) == 0) and int(form.neg.min()) >= -128
    assert not torch.any((form.pos != 0) & (form.neg != 0))
    assert torch.equal(form.dequantize(), q(w))                      # bit for bit
    assert form.scale_pos.shape == form.mu.shape == (w.shape[0],)


def test_shift_form_needs_integer_steps_and_int8_room():
    w = _laplace()
    learned = LLAQuantizer(4, k_candidates=(1.5,))
    learned.init_from(w)
    assert learned.shift_form(w) is None                             # 2^(l/1.5): no shift
    wide = LLAQuantizer(5, power_of_two=True)
    wide.init_from(w)
    assert wide.shift_form(w) is None                                # 2^15 > int8
