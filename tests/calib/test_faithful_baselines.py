"""The baselines as their official code defines them: layer units end after the activation
that follows the layer, QDrop mixes once per element at the unit input, PD-Quant's KL and
distribution correction."""
import copy

import pytest
import torch
import torch.nn.functional as F
from calib_toy import forward_fn, make_batches, make_float, make_quant, output_fn
from torch import nn

from mmdet_regptq.calib import (ActivationCache, OutputMSE, PDQuant, PredictionKL, QDrop,
                                ReconContext, capture_unit, find_units, output_mse,
                                reconstruct)
from mmdet_regptq.calib._utils import quant_disabled
from mmdet_regptq.calib.methods.pdquant import _channel_stats, distribution_correction
from mmdet_regptq.quant import init_activation_quantizers, quantize_model, set_quant_state

pytestmark = pytest.mark.usefixtures('single_thread')


class Neckish(nn.Module):
    """The patterns a unit's end must tell apart: ConvModule (conv -> GN -> in-place ReLU),
    YOLOv5's Conv (conv -> folded BN = Identity -> SiLU), an FPN output that is also
    ReLU'd for an extra conv, and a conv followed by an in-place residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.act = nn.ReLU(inplace=True)
        self.silu_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.Identity()
        self.silu = nn.SiLU(inplace=True)
        self.fpn_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.extra = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.res_conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        a = self.act(self.gn(self.gn_conv(x)))
        b = self.silu(self.bn(self.silu_conv(a)))
        p = self.fpn_conv(b)
        extra = self.extra(F.relu(p))            # p is also an output: no chain
        r = self.res_conv(b)
        r += b                                   # in place before the ReLU: no chain
        return p, extra, F.relu(r)


def _quantized_neckish():
    torch.manual_seed(0)
    model = Neckish().eval()
    batch = torch.randn(2, 3, 12, 12)
    quantize_model(model, dict(w_bits=4, a_bits=4), example_forward=lambda m: m(batch))
    init_activation_quantizers(model, lambda: [model(batch)])
    return model, batch


def test_layer_units_end_after_the_activation_that_follows_them():
    model, batch = _quantized_neckish()
    units = {u.name: u for u in find_units(model, lambda m, b: m(b), batch, block_scopes=())}
    assert units['gn_conv'].post.describe() == 'group_norm -> relu'
    assert units['silu_conv'].post.describe() == 'silu'
    assert units['stem'].post.describe() == ''          # read by a conv, no activation
    assert units['fpn_conv'].post.describe() == ''      # its output has a second reader
    assert units['res_conv'].post.describe() == ''      # modified in place first
    assert units['extra'].post.describe() == ''
    old = find_units(model, lambda m, b: m(b), batch, block_scopes=(), with_activation=False)
    assert not any(u.post for u in old)
    # the unit's output is the model's post-activation tensor, recomputed out of place
    unit = units['silu_conv']
    seen = {}

    def keep(key, tensor):
        seen[key] = tensor.detach().clone()      # returns None: the model's tensors stay

    model.silu.register_forward_hook(lambda m, a, out: keep('out', out))
    model.silu_conv.register_forward_pre_hook(lambda m, a: keep('in', a[0]))
    with torch.no_grad():
        model(batch)
        assert torch.allclose(unit(seen['in']), seen['out'])


@pytest.fixture(scope='module')
def toy():
    model = make_quant(make_float())
    batches = make_batches()
    init_activation_quantizers(model, lambda: [model(b) for b in batches])
    return model, batches


def _unit(model, batches, name):
    return {u.name: u for u in find_units(model, forward_fn, batches[0])}[name]


def test_targets_and_fisher_gradients_are_taken_after_the_activation(toy):
    model, batches = toy
    unit = _unit(model, batches, 'head.conv')              # conv -> F.relu, two FPN levels
    assert unit.post.describe() == 'relu' and unit.num_calls == 2
    pre = []
    handle = unit.module.register_forward_hook(lambda m, a, out: pre.append(out.detach()))
    set_quant_state(model, weight=False, input=False)
    try:
        cache = capture_unit(model, unit, batches[:1], forward_fn, ActivationCache(),
                             grad_loss=output_mse)
    finally:
        handle.remove()
    fp_pre = pre[:2]                                       # the FP pass comes first
    for i, z in enumerate(fp_pre):
        entry = cache[i]
        assert torch.equal(entry.output, F.relu(z))        # target: after the ReLU
        grad = entry.extras['grad'][0]
        assert grad.shape == z.shape
        # dL/d relu(z) reaches positions where z < 0 (dL/dz would be 0 there)
        assert grad[z < 0].abs().sum() > 0


def _record_conv_inputs(layer):
    seen = []
    original = layer.module._conv_forward

    def conv_forward(x, weight, bias):
        if layer.training:
            seen.append(x.detach().clone())
        return original(x, weight, bias)

    layer.module._conv_forward = conv_forward
    return seen


@pytest.mark.parametrize('unit_name', ['head.conv', 'backbone.layer2'])
def test_qdrop_unit_input_takes_two_states_with_p_half(toy, unit_name):
    """Each input element of a unit is Q(x_q) or x_fp, half each; never x_q unquantized nor
    Q(x_fp) (the four states of a second drop by the unit's own input quantizer)."""
    model, batches = toy
    model = copy.deepcopy(model).eval()      # calibrate runs in eval mode
    unit = _unit(model, batches, unit_name)
    first = unit.layers[0][1]                              # reads the unit input directly
    gen = torch.Generator().manual_seed(3)
    x_q = torch.randn(2, first.in_channels, 8, 8, generator=gen).relu() * 2
    x_fp = x_q + 0.013
    cache = ActivationCache()
    cache.add((x_q,), {}, output=unit(x_fp).detach(), fp_args=(x_fp,))
    method = QDrop(iters=1, progress=False, log_interval=0)
    groups = method.prepare_unit(unit)
    unit.set_quant(True)
    seen = _record_conv_inputs(first)
    with torch.no_grad():
        quantized = first.input_quantizer(x_q)
        q_of_fp = first.input_quantizer(x_fp)
    reconstruct(unit, cache, iters=4, losses=[OutputMSE()], param_groups=groups[:1],
                drop_prob=0.5, fp_input_prob=0.5, log_interval=0)
    assert len(seen) == 4
    for x in seen:
        is_q = torch.isclose(x, quantized, atol=1e-6)
        is_fp = torch.isclose(x, x_fp, atol=1e-6)
        assert (is_q | is_fp).all()
        distinct = ~torch.isclose(quantized, x_fp, atol=1e-6)
        share = is_fp[distinct].float().mean().item()
        assert 0.45 < share < 0.55, share
        raw = torch.isclose(x, x_q, atol=1e-6) & ~is_q & ~is_fp
        wrong_q = torch.isclose(x, q_of_fp, atol=1e-6) & ~is_q & ~is_fp
        assert not raw.any() and not wrong_q.any()


def test_qdrop_layers_inside_a_block_still_drop_their_own_inputs(toy):
    model, batches = toy
    model = copy.deepcopy(model).eval()
    unit = _unit(model, batches, 'backbone.layer2')
    inner = dict(unit.layers)['backbone.layer2.conv2']
    x = torch.randn(2, 16, 8, 8).relu()
    cache = ActivationCache()
    cache.add((x,), {}, output=unit(x).detach(), fp_args=(x + 0.01,))
    method = QDrop(iters=1, progress=False, log_interval=0)
    groups = method.prepare_unit(unit)
    unit.set_quant(True)
    seen = []
    original = inner.quantize_input

    def quantize_input(x, slot=None):
        out = original(x, slot)
        if inner.training:
            with torch.no_grad():
                q = inner.input_quantizer(x)
            distinct = ~torch.isclose(x, q)
            seen.append(torch.isclose(out, x)[distinct].float().mean())
        return out

    inner.quantize_input = quantize_input
    reconstruct(unit, cache, iters=2, losses=[OutputMSE()], param_groups=groups[:1],
                drop_prob=0.5, fp_input_prob=0.5, log_interval=0)
    assert seen and all(0.3 < float(s) < 0.7 for s in seen)


# ---------------------------------------------------------------------- PD-Quant
def test_prediction_kl_is_pdquants_official_form():
    gen = torch.Generator().manual_seed(0)
    fp, q = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    ctx = ReconContext(unit=None, pred=[], target=[], fisher=None, quantizers=[],
                       iteration=0, total_iters=1, final_pred=q, final_target=fp)
    t, lambda_r = 4.0, 0.1
    official = torch.nn.KLDivLoss(reduction='batchmean')(
        F.log_softmax(q / t, dim=1), F.softmax(fp / t, dim=1)) / lambda_r
    got = PredictionKL(temperature=t, weight=1 / lambda_r)(ctx)
    assert got.item() == pytest.approx(official.item(), rel=1e-5)    # no T^2 factor
    terms = PDQuant(sigmoid=True, iters=1).losses(None, output_fn=None, global_loss=None)
    kl = [t for t in terms if isinstance(t, PredictionKL)][0]
    assert kl.sigmoid and kl.temperature == 4.0 and kl.weight == pytest.approx(10.0)
    assert PredictionKL.final_from_quant_input


def test_pdquant_sigmoid_comes_from_the_adapter():
    method = PDQuant(iters=1)
    with pytest.raises(ValueError, match='sigmoid'):
        method.losses(None, output_fn=None, global_loss=None)
    method.set_output_defaults(sigmoid=True)
    assert method.sigmoid is True
    given = PDQuant(iters=1, sigmoid=False)
    given.set_output_defaults(sigmoid=True)
    assert given.sigmoid is False


def test_distribution_correction_moves_fp_inputs_toward_the_population_statistics(toy):
    model, batches = toy
    model = copy.deepcopy(model)
    unit = _unit(model, batches, 'backbone.layer2')
    set_quant_state(model, weight=False, input=False)
    cache = capture_unit(model, unit, batches, forward_fn, ActivationCache(), fp_inputs=True)

    def stat_error(c):
        outs = []
        hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o))
                 for _, layer in unit.layers]
        with torch.no_grad(), quant_disabled(unit.module):
            for i in range(len(c)):
                unit(*c[i].extras['fp_args'])
        for h in hooks:
            h.remove()
        k = len(unit.layers)
        per_layer = [torch.cat([o for j, o in enumerate(outs) if j % k == li]) for li in range(k)]
        err = 0.0
        for o in per_layer:
            flat = o.transpose(0, 1).reshape(o.shape[1], -1)
            mean, std = flat.mean(1), flat.std(1)
            m, sd = _channel_stats(o)
            err += float(((m - mean) ** 2).sum() + ((sd - std) ** 2).sum())
        return err

    before = stat_error(cache)
    originals = [cache[i].extras['fp_args'][0].clone() for i in range(len(cache))]
    corrected = distribution_correction(unit, cache, iters=60, lr=1e-2, lambda_c=0.02)
    assert len(corrected) == len(originals)
    assert stat_error(corrected) < before
    for i, x in enumerate(originals):
        entry = corrected[i]
        moved = entry.extras['fp_args'][0]
        assert not torch.equal(moved, x) and (moved - x).abs().mean() < x.abs().mean()
        with torch.no_grad(), quant_disabled(unit.module):
            assert torch.allclose(entry.output, unit(moved), atol=1e-5)


def test_pdquant_calibrates_with_dc_and_the_unmixed_prediction_pass(toy, monkeypatch):
    float_model, batches = make_float(), make_batches(2)
    model = make_quant(float_model)
    calls = []
    import mmdet_regptq.calib.methods.pdquant as pdquant
    real = pdquant.distribution_correction

    def spy(unit, cache, **kw):
        calls.append(unit.name)
        return real(unit, cache, **kw)

    monkeypatch.setattr(pdquant, 'distribution_correction', spy)
    method = PDQuant(iters=3, sigmoid=False, dc_iters=5, progress=False, log_interval=0)
    stats = method.calibrate(model, batches, forward_fn, output_fn=output_fn)
    assert len(stats) == 8
    assert calls == ['backbone.stem', 'backbone.layer1', 'backbone.down', 'backbone.layer2']
