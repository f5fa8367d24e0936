"""AdaRoundQuantizer: initialisation, regulariser, hardening, export."""
import pytest
import torch

from mmdet_regptq.quant import AdaRoundQuantizer, UniformQuantizer
from mmdet_regptq.registry import QUANTIZERS, build_from


def _setup(symmetric=False, bits=4):
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    base = UniformQuantizer(bits, symmetric=symmetric, per_channel=True)
    base.init_from(w)
    return base, w


@pytest.mark.parametrize('symmetric', [True, False])
def test_init_reproduces_weight_and_nearest_rounding(symmetric):
    base, w = _setup(symmetric)
    ada = AdaRoundQuantizer(base, w)
    assert ada.is_initialized() and ada.soft_targets
    qmin, qmax = ada.quant_range
    z = ada.zero_point
    inside_grid = torch.clamp(w / ada.scale, qmin - z, qmax - z) * ada.scale
    assert torch.allclose(ada(w), inside_grid, atol=1e-5)  # soft: the (clipped) float weight
    ada.soft_targets = False
    assert torch.allclose(ada(w), base(w).detach(), atol=1e-6)   # hard: nearest grid point
    assert not base.scale.requires_grad or ada.scale is not base.scale
    assert 'scale' not in dict(ada.named_parameters())   # frozen grid


def test_alpha_receives_gradient_in_soft_mode():
    base, w = _setup()
    ada = AdaRoundQuantizer(base, w)
    ada(w).pow(2).sum().backward()
    assert ada.alpha.grad is not None and ada.alpha.grad.abs().sum() > 0


def test_regularizer_decreases_toward_hard_values():
    base, w = _setup()
    ada = AdaRoundQuantizer(base, w)
    half = AdaRoundQuantizer(base, w)
    with torch.no_grad():
        half.alpha.zero_()                                 # h = 0.5: maximal penalty
    assert half.regularizer(2.0).item() == pytest.approx(w.numel(), rel=1e-5)
    assert ada.regularizer(2.0).item() < w.numel()
    opt = torch.optim.Adam([ada.alpha], lr=0.1)
    values = []
    for _ in range(50):
        opt.zero_grad()
        loss = ada.regularizer(2.0)
        values.append(loss.item())
        loss.backward()
        opt.step()
    assert values[-1] < 0.1 * values[0]
    ada.harden()
    assert ada.regularizer(2.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize('symmetric', [True, False])
def test_harden_gives_floor_or_ceil_on_grid(symmetric):
    base, w = _setup(symmetric)
    ada = AdaRoundQuantizer(base, w)
    with torch.no_grad():                                  # arbitrary learnt rounding
        ada.alpha.normal_(generator=torch.Generator().manual_seed(1))
    ada.harden()
    assert not ada.soft_targets and not ada.alpha.requires_grad
    y = ada(w)
    s, z = ada.scale, ada.zero_point
    qmin, qmax = ada.quant_range
    codes = y / s
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    floor = torch.floor(w / s).clamp(qmin - z, qmax - z)
    ceil = (torch.floor(w / s) + 1).clamp(qmin - z, qmax - z)
    assert torch.all((codes.round() == floor) | (codes.round() == ceil))
    ada.soft_targets = True                                # hard for good
    assert torch.equal(ada(w), y)
    codes_int = ada.to_int(w)
    assert codes_int.dtype == torch.int32
    assert torch.allclose((codes_int - z) * s, y, atol=1e-6)
    assert torch.allclose(ada.fake_quant_export(w), y, atol=1e-6)


def test_registry_and_errors():
    base, w = _setup()
    ada = build_from(QUANTIZERS, dict(type='AdaRound', zeta=1.1, gamma=-0.1), 'rounding',
                     base=base, weight=w)
    assert isinstance(ada, AdaRoundQuantizer)
    with pytest.raises(ValueError, match='not initialised'):
        AdaRoundQuantizer(UniformQuantizer(4, per_channel=True), w)
    with pytest.raises(ValueError, match='shape'):
        ada(w[:3])
