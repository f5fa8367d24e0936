"""LLAQRoundQuantizer: LLAQ's log grid with AdaRound's learned choice of neighbour."""
import pytest
import torch

from mmdet_regptq.quant import SEARCH_K, LLAQRoundQuantizer, LLAQuantizer
from mmdet_regptq.registry import QUANTIZERS, build_from


def _laplace(shape=(16, 8, 3, 3), scale=0.02, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(*shape, generator=gen) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


def _levels(q):
    """Every grid value of each weight's channel and side (``[..., L + 1]``, level 0 first)."""
    scale, step = q._scale_step()
    pos = q.sign.float() > 0
    top = torch.where(pos, float(q.top[0]), float(q.top[1]))
    s = torch.where(pos, scale[0], scale[1])
    r = torch.where(pos, step[0], step[1])
    levels = torch.arange(0, max(q.top) + 1, dtype=torch.float32)
    mags = [torch.where((lv > 0) & (lv <= top), s * torch.exp2((lv - top) * r),
                        torch.where(lv == 0, torch.zeros_like(s), torch.full_like(s, 1e9)))
            for lv in levels]
    return torch.stack(mags, -1)


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_soft_start_is_the_weight_and_hard_start_the_nearest_level(bits):
    w = _laplace(seed=bits)
    q = LLAQRoundQuantizer(bits, k_candidates=SEARCH_K)
    q.init_from(w)
    top = torch.where(q.sign > 0, float(q.top[0]), float(q.top[1]))
    inside = q.base_level.float() < top                    # not clipped at the top level
    assert inside.float().mean() > 0.8
    q.soft_targets = True
    soft = q(w)
    assert torch.allclose(soft[inside], w[inside], atol=1e-4 * w.abs().max().item())
    q.soft_targets = False
    hard_mag = (q(w) - q.mu).abs()
    nearest = (_levels(q) - (w - q.mu).abs()[..., None]).abs().min(-1).values
    assert torch.allclose(((w - q.mu).abs() - hard_mag).abs(), nearest, atol=1e-6)
    plain = LLAQuantizer(bits, k_candidates=SEARCH_K)      # same grid, rounding of psi
    plain.init_from(w)
    assert ((q(w) - w) ** 2).mean() <= ((plain(w) - w) ** 2).mean()


def test_soft_gradients_reach_alpha_k_and_a_and_the_regulariser_pulls_to_0_or_1():
    w = _laplace()
    q = LLAQRoundQuantizer(3, k_candidates=(1.0, 2.0))
    q.init_from(w)
    q.soft_targets = True
    (q(w) * torch.randn_like(w)).sum().backward()
    for param in (q.alpha, q.k_pos, q.a_pos, q.k_neg, q.a_neg):
        assert param.grad is not None and param.grad.abs().sum() > 0
    before = q.regularizer(2.0).item()
    opt = torch.optim.Adam([q.alpha], lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        q.regularizer(2.0).backward()
        opt.step()
    assert q.regularizer(2.0).item() < 0.5 * before


@pytest.mark.parametrize('power_of_two', [False, True])
def test_hardened_integer_form_shift_form_and_state_dict_are_exact(power_of_two):
    w = _laplace(seed=3)
    q = build_from(QUANTIZERS, dict(type='LLAQRound', bits=3, power_of_two=power_of_two),
                   'weight')
    assert isinstance(q, LLAQRoundQuantizer) and isinstance(q, LLAQuantizer)
    q.init_from(w)
    with torch.no_grad():                                  # a trained state
        q.alpha.add_(torch.randn_like(q.alpha))
        q.a_pos.add_(0.2)
    q.harden()
    assert q.hardened and not q.soft_targets and not q.alpha.requires_grad
    fake = q(w)
    assert torch.equal(LLAQuantizer.from_int(q.to_int(w)), fake)
    codes = q.to_codes(w)
    lo, hi = q.quant_range
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    if power_of_two:
        form = q.shift_form(w)
        assert form is not None and torch.equal(form.dequantize(), fake)
    fresh = LLAQRoundQuantizer(3, power_of_two=power_of_two)
    fresh.load_state_dict(q.state_dict())                  # lazy shapes resized
    assert torch.equal(fresh(w), fake)


def test_rounding_is_bound_to_the_weight_shape():
    q = LLAQRoundQuantizer(4)
    q.init_from(_laplace())
    with pytest.raises(ValueError, match='initialised from'):
        q(_laplace(shape=(8, 8, 3, 3)))
