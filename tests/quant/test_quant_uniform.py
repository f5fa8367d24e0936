"""UniformQuantizer: grid, clipping, LSQ/STE gradients, scale searches, export, state."""
import itertools
import math

import pytest
import torch

from mmdet_regptq.quant import UniformQuantizer, round_ste
from mmdet_regptq.registry import QUANTIZERS, build_from

CASES = list(itertools.product([2, 3, 4, 8], [True, False], [True, False]))


def _make(bits, symmetric, per_channel, method='minmax', x=None, **kw):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 3, 3, generator=gen) if x is None else x
    q = UniformQuantizer(bits, symmetric=symmetric, per_channel=per_channel,
                         scale_method=method, **kw)
    q.init_from(x)
    return q, x


@pytest.mark.parametrize('bits,symmetric,per_channel', CASES)
def test_grid_values_and_clipping(bits, symmetric, per_channel):
    q, x = _make(bits, symmetric, per_channel)
    qmin, qmax = q.quant_range
    assert qmax - qmin + 1 == 2 ** bits
    assert (qmin < 0) == symmetric
    s, z = q.scale.detach(), q.zero_point
    assert s.shape == ((4, 1, 1, 1) if per_channel else ())
    assert torch.equal(z, z.round())
    if symmetric:
        assert torch.all(z == 0)

    y = q(3 * x)
    codes = y / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3

    big = torch.full_like(x, 1e4)
    assert torch.allclose(q(big), ((qmax - z) * s).expand_as(x))
    assert torch.allclose(q(-big), ((qmin - z) * s).expand_as(x))

    on_grid = (torch.randint(qmin, qmax + 1, x.shape).float() - z) * s
    assert torch.allclose(q(on_grid), on_grid, atol=1e-6)
    assert torch.equal(q(torch.zeros_like(x)), torch.zeros_like(x))   # zero is exact
    # minmax covers the data: error at most half a step inside the range
    assert torch.all((q(x) - x).abs() <= s / 2 + 1e-6)


@pytest.mark.parametrize('bits,symmetric,per_channel', CASES)
def test_distinct_levels_bounded(bits, symmetric, per_channel):
    q, _ = _make(bits, symmetric, per_channel)
    y = q(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1)) * 4)
    for row in (y.reshape(4, -1) if per_channel else y.reshape(1, -1)):
        assert row.unique().numel() <= 2 ** bits
    codes = q.to_int(y)
    assert codes.dtype == torch.int32
    assert codes.min() >= q.quant_range[0] and codes.max() <= q.quant_range[1]
    assert torch.allclose((codes - q.zero_point) * q.scale.detach(), y, atol=1e-6)


@pytest.mark.parametrize('symmetric', [True, False])
def test_lsq_gradient_and_ste(symmetric):
    x0 = torch.linspace(-1, 1, 200)
    q = UniformQuantizer(3, symmetric=symmetric)
    q.init_from(x0)
    x = (x0 * 1.5).requires_grad_(True)             # part of it outside the range
    q(x).sum().backward()
    s, z = q.scale.detach(), q.zero_point
    qmin, qmax = q.quant_range
    v = x.detach() / s + z
    inside = (v > qmin) & (v < qmax)
    assert 0 < inside.sum() < x.numel()
    assert torch.equal(x.grad, inside.float())       # STE: 1 inside, 0 outside
    per_elem = torch.where(inside, torch.round(v) - v,   # LSQ: round(x/s) - x/s inside
                           torch.where(v <= qmin, qmin - z, qmax - z))
    expected = per_elem.sum() / math.sqrt(x.numel() * qmax)
    assert q.scale.grad is not None
    assert torch.allclose(q.scale.grad, expected, rtol=1e-4, atol=1e-6)


def test_round_ste_forward_and_gradient():
    x = torch.tensor([0.4, 0.6, 1.5, -2.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, x.detach().round())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


def test_not_learnable_scale_has_no_grad():
    q = UniformQuantizer(4, learnable=False)
    q.init_from(torch.randn(10))
    assert not q.scale.requires_grad


@pytest.mark.parametrize('method', ['lp', 'mse'])
@pytest.mark.parametrize('per_channel', [False, True])
def test_search_beats_minmax_on_laplace(method, per_channel):
    x = torch.distributions.Laplace(0.0, 1.0).sample((8, 2000))
    errors = {}
    for m in ('minmax', method):
        q = UniformQuantizer(3, per_channel=per_channel, scale_method=m, ch_axis=0)
        q.init_from(x)
        errors[m] = (q(x) - x).pow(2).mean().item()
    assert errors[method] < 0.8 * errors['minmax']


@pytest.mark.parametrize('symmetric', [True, False])
def test_percentile(symmetric):
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(9990, generator=gen), torch.full((10,), 100.0)])
    q = UniformQuantizer(8, symmetric=symmetric, scale_method='percentile', percentile=99.0)
    q.init_from(x)
    qmin, qmax = q.quant_range
    s, z = q.scale.item(), q.zero_point.item()
    if symmetric:
        assert s * qmax == pytest.approx(torch.quantile(x.abs(), 0.99).item(), rel=1e-4)
    else:
        lo, hi = torch.quantile(x, 0.01).item(), torch.quantile(x, 0.99).item()
        assert s * (qmax - qmin) == pytest.approx(hi - lo, rel=1e-4)
        assert (qmin - z) * s == pytest.approx(lo, abs=s)
    assert q(x).max().item() < 10.0                  # outliers clipped


def test_search_subsamples_deterministically():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(0))
    scales = []
    for _ in range(2):
        q = UniformQuantizer(4, scale_method='lp', max_search_elements=5_000)
        q.init_from(x)
        scales.append(q.scale.detach().clone())
    assert torch.equal(scales[0], scales[1])


@pytest.mark.parametrize('bits,symmetric,per_channel', CASES)
def test_export_op_equals_forward(bits, symmetric, per_channel):
    q, x = _make(bits, symmetric, per_channel)
    y = 2 * torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(q.fake_quant_export(y), q(y).detach())


def test_export_per_channel_activation_axis():
    x = torch.randn(2, 5, 4, 4)
    q = UniformQuantizer(4, per_channel=True, ch_axis=1)
    q.init_from(x)
    assert q.scale.shape == (1, 5, 1, 1)
    assert torch.equal(q.fake_quant_export(x), q(x).detach())


def test_forward_before_init_raises_with_name():
    q = UniformQuantizer(4, name='backbone.conv1.input_quantizer')
    assert not q.is_initialized()
    with pytest.raises(RuntimeError, match='backbone.conv1.input_quantizer'):
        q(torch.randn(3))
    q.enabled = False
    x = torch.randn(3)
    assert q(x) is x


@pytest.mark.parametrize('kw', [dict(bits=1), dict(bits=17), dict(bits=4, scale_method='x'),
                                dict(bits=4, percentile=0.0), dict(bits=4, p=0.0)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        UniformQuantizer(**kw)


def test_registry_build_and_unknown_type():
    q = build_from(QUANTIZERS, dict(type='Uniform', bits=4, symmetric=True), 'weight')
    assert isinstance(q, UniformQuantizer) and q.symmetric and q.bits == 4
    with pytest.raises(KeyError, match='weight'):
        build_from(QUANTIZERS, dict(type='Nope', bits=4), 'weight')


def test_state_dict_round_trip_resizes_lazy_shapes():
    q, x = _make(4, False, True, method='lp')
    fresh = UniformQuantizer(4, per_channel=True)
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_initialized()
    assert torch.equal(fresh(x), q(x))
    assert q.quant_params()['scale'].shape == (4, 1, 1, 1)
