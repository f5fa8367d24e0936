"""calib building blocks: units, cache, capture, tail runner, loss terms."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from calib_toy import forward_fn, make_batches, make_float, make_quant

from mmdet_regptq.calib import (ActivationCache, CacheEntry, FisherMSE, LinearTempDecay,
                                OutputMSE, PredictionKL, ReconContext, RoundingRegularizer,
                                TailRunner, capture_unit, find_units, maximal_prefix,
                                trace_calls)
from mmdet_regptq.calib._utils import quant_disabled
from mmdet_regptq.quant import init_activation_quantizers, set_quant_state

pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def quant_model():
    model = make_quant(make_float())
    batches = make_batches()
    init_activation_quantizers(model, lambda: [model(b) for b in batches])
    return model, batches


def test_find_units_blocks_layers_and_shared_head(quant_model):
    model, batches = quant_model
    units = find_units(model, forward_fn, batches[0])
    assert [(u.name, u.kind) for u in units] == [
        ('backbone.stem', 'layer'), ('backbone.layer1', 'block'), ('backbone.down', 'layer'),
        ('backbone.layer2', 'block'), ('neck.lat2', 'layer'), ('neck.lat1', 'layer'),
        ('head.conv', 'layer'), ('head.cls', 'layer')]
    assert [n for n, _ in units[1].layers] == ['backbone.layer1.conv1', 'backbone.layer1.conv2']
    assert {u.name: u.num_calls for u in units}['head.conv'] == 2
    layer_wise = find_units(model, forward_fn, batches[0], block_scopes=())
    assert len(layer_wise) == 10 and all(u.kind == 'layer' for u in layer_wise)


def test_find_units_needs_quantized_layers():
    with pytest.raises(ValueError, match='no quantized layer'):
        find_units(make_float(), forward_fn, make_batches(1)[0])


def test_cache_spills_past_the_cap(tmp_path):
    cache = ActivationCache(max_bytes=4 * 4 * 16, spill_dir=str(tmp_path))  # one entry
    values = [torch.full((16,), float(i)) for i in range(6)]
    for i, v in enumerate(values):
        cache.add((v,), {'scale': v * 2}, output=v + 1, key=('b', i), grad=[v])
        v.add_(100)  # the cache holds copies, not the caller's tensors
    assert len(cache) == 6 and cache.num_spilled == 5
    assert cache.bytes_in_memory == 4 * 16 * 4 and cache.bytes_on_disk == 5 * 4 * 16 * 4
    assert isinstance(cache._items[0], CacheEntry)
    for i in range(6):
        entry = cache[cache.index(('b', i))]
        assert torch.equal(entry.args[0], torch.full((16,), float(i)))
        assert torch.equal(entry.kwargs['scale'], torch.full((16,), 2.0 * i))
        assert torch.equal(entry.extras['grad'][0], torch.full((16,), float(i)))
    spill = [d for d in os.listdir(tmp_path)]
    files = [f for f in os.listdir(tmp_path / spill[0]) if f.startswith('entry_')]
    assert len(spill) == 1 and len(files) == 5
    cache.clear()
    assert len(cache) == 0 and os.listdir(tmp_path) == [] and cache.bytes_on_disk == 0


def test_capture_stops_after_the_unit_and_records_grads(quant_model):
    model, batches = quant_model
    units = find_units(model, forward_fn, batches[0])
    unit = units[1]  # backbone.layer1
    calls = []
    handle = model.neck.register_forward_pre_hook(lambda *a: calls.append(1))
    set_quant_state(model, False, False)
    units[0].set_quant(True)
    try:
        cache = capture_unit(model, unit, batches, forward_fn, ActivationCache(),
                             fp_inputs=True)
        assert calls == []  # both passes stopped inside the backbone
        head = capture_unit(model, units[6], batches, forward_fn, ActivationCache(),
                            grad_loss=lambda fp, q: sum((a - b).pow(2).sum()
                                                        for a, b in zip(fp, q)))
    finally:
        handle.remove()
    assert len(cache) == len(batches)
    entry = cache[0]
    assert entry.args[0].shape == entry.output.shape == (2, 8, 8, 8)
    assert not torch.equal(entry.args[0], entry.extras['fp_args'][0])  # stem quantized
    assert len(head) == 2 * len(batches) and head.keys()[(3, 1)] == 7
    grad = head[0].extras['grad']
    assert len(grad) == 1 and grad[0].shape == head[0].output.shape
    assert grad[0].abs().sum() > 0


@pytest.mark.parametrize('unit_name', ['backbone.layer2', 'neck.lat1', 'head.cls'])
def test_capture_from_a_tail_runner_equals_full_passes(quant_model, unit_name):
    """With a prepared TailRunner the capture starts from the stored prefix and the FP
    targets: same inputs, outputs and Fisher gradients as the full forwards."""
    model, batches = quant_model
    units = find_units(model, forward_fn, batches[0])
    k = [u.name for u in units].index(unit_name)
    unit = units[k]
    loss = lambda fp, q: sum((a - b).pow(2).sum() for a, b in zip(fp, q))  # noqa: E731
    set_quant_state(model, False, False)
    for u in units[:k]:
        u.set_quant(True)
    try:
        full = capture_unit(model, unit, batches, forward_fn, ActivationCache(),
                            fp_inputs=True, grad_loss=loss)
        tail = TailRunner(model, forward_fn, batches)
        tail.prepare(unit)
        runs = tail.num_runs
        reused = capture_unit(model, unit, batches, forward_fn, ActivationCache(),
                              fp_inputs=True, grad_loss=loss, tail=tail)
        assert tail.num_runs - runs == len(batches)  # one tail run per batch
        with pytest.raises(ValueError, match='prepared for'):
            tail.unit = units[0]
            capture_unit(model, unit, batches, forward_fn, ActivationCache(), tail=tail)
    finally:
        set_quant_state(model, True, True)
    assert len(full) == len(reused) > 0
    for i in range(len(full)):
        a, b = full[i], reused[i]
        for x, y in zip([*a.args, a.output, *a.extras['fp_args'], *a.extras['grad']],
                        [*b.args, b.output, *b.extras['fp_args'], *b.extras['grad']]):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_capture_shares_fisher_gradients_with_later_units(quant_model):
    """share_with keeps the gradients reaching later units' outputs in unit k's pass: the
    same as a plain backward with units <= k quantized and the later ones FP; a later unit
    captured with them as given_grads stores them without a gradient pass."""
    model, batches = quant_model
    units = find_units(model, forward_fn, batches[0])
    k = [u.name for u in units].index('backbone.layer2')
    # neck.lat2 (downstream), neck.lat1 (reads layer1: prefix in the tail run), head.conv
    # (2 calls)
    later = [units[k + 1], units[k + 2], units[k + 3]]
    loss = lambda fp, q: sum((a - b).pow(2).sum() for a, b in zip(fp, q))  # noqa: E731
    set_quant_state(model, False, False)
    for u in units[:k]:
        u.set_quant(True)
    shared = {u.name: ActivationCache() for u in later}
    try:
        tail = TailRunner(model, forward_fn, batches)
        tail.prepare(units[k])
        capture_unit(model, units[k], batches, forward_fn, ActivationCache(),
                     grad_loss=loss, tail=tail, share_with=later, shared_grads=shared)
        units[k].set_quant(True)
        expected = {u.name: [] for u in later}
        for batch in batches:
            with torch.no_grad(), quant_disabled(model):
                fp_final = forward_fn(model, batch)
            outs = {u.name: [] for u in later}
            hooks = [u.module.register_forward_hook(
                lambda m, a, o, name=u.name: outs[name].append(o.requires_grad_()) or
                o.clone()) for u in later if not u.post]
            head = model.head

            def head_forward(feats):   # head.conv's unit output is after its F.relu
                res = []
                for f in feats:
                    a = F.relu(head.conv(f))
                    outs['head.conv'].append(a)
                    res.append(head.cls(a.clone()))
                return res

            assert [u.name for u in later if u.post] == ['head.conv']
            head.forward = head_forward
            try:
                x = batch.clone()
                final = forward_fn(model, x)
                grads = torch.autograd.grad(loss(fp_final, final),
                                            [o for u in later for o in outs[u.name]],
                                            allow_unused=True)
            finally:
                del head.forward
                for h in hooks:
                    h.remove()
            it = iter(grads)
            for u in later:
                expected[u.name].append([[next(it)] for _ in outs[u.name]])
        units[k + 1].set_quant(False)
        tail.prepare(later[0])
        given = capture_unit(model, later[0], batches, forward_fn, ActivationCache(),
                             tail=tail, given_grads=shared[later[0].name])
        with pytest.raises(ValueError, match='exclude'):
            capture_unit(model, later[0], batches, forward_fn, ActivationCache(),
                         tail=tail, grad_loss=loss, given_grads=shared[later[0].name])
    finally:
        set_quant_state(model, True, True)
    for u in later:
        cache = shared[u.name]
        assert len(cache) == len(batches) * u.num_calls
        for b, want_b in enumerate(expected[u.name]):
            for i, want in enumerate(want_b):
                got = cache[cache.index((b, i))].extras['grad']
                assert len(got) == 1 and got[0].abs().sum() > 0
                torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
    lat2 = shared[later[0].name]
    for b in range(len(batches)):
        assert given[b].extras['grad'][0] is lat2[lat2.index((b, 0))].extras['grad'][0]


def test_capture_of_a_unit_the_loss_does_not_see_gives_zero_grads(quant_model):
    """A grad_loss that ignores the unit's outputs (Mask R-CNN's mask head under a box
    loss) gives zero gradients, not an autograd error."""
    model, batches = quant_model
    units = find_units(model, forward_fn, batches[0])
    set_quant_state(model, False, False)
    try:
        cache = capture_unit(model, units[1], batches[:1], forward_fn, ActivationCache(),
                             grad_loss=lambda fp, q: torch.zeros(()))
    finally:
        set_quant_state(model, True, True)
    grads = cache[0].extras['grad']
    assert grads and all(not g.any() for g in grads)


def test_tail_runner_runs_untraced_direct_forward_calls_live(quant_model):
    """A direct ``module.forward(x)`` call runs no hooks, so the trace does not count it
    (CondInst calls ``bbox_head.forward(x)`` and ``bbox_head(x)``): the extra call of a
    prefix module runs live instead of failing, and the outputs stay those of the model."""
    model, batches = quant_model

    def direct_then_called(m, batch):
        feats = m.neck.forward(m.backbone(batch))   # untraced direct call
        return m.head(m.neck(m.backbone(batch)))

    units = find_units(model, direct_then_called, batches[0])
    k = [u.name for u in units].index('head.cls')
    set_quant_state(model, False, False)
    for unit in units[:k + 1]:
        unit.set_quant(True)
    try:
        tail = TailRunner(model, direct_then_called, batches)
        tail.prepare(units[k])
        with torch.no_grad():
            result = tail.run(1)
            full = model(batches[1])
    finally:
        set_quant_state(model, True, True)
    for a, b in zip(result.outputs, full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_maximal_prefix_is_outermost_finished_calls(quant_model):
    model, batches = quant_model
    records, _ = trace_calls(model, forward_fn, batches[0])
    start = next(r for r in records if r.name == 'neck.lat1').start
    names = [r.name for r in maximal_prefix(records, start)]
    assert names == ['backbone', 'neck.lat2']


@pytest.mark.parametrize('unit_name', ['backbone.layer2', 'neck.lat1', 'head.cls'])
def test_tail_runner_equals_full_forward_and_skips_prefix(quant_model, unit_name):
    model, batches = quant_model
    units = find_units(model, forward_fn, batches[0])
    k = [u.name for u in units].index(unit_name)
    set_quant_state(model, False, False)
    for unit in units[:k + 1]:
        unit.set_quant(True)
    tail = TailRunner(model, forward_fn, batches)
    tail.prepare(units[k])
    stem_calls = []  # the stem's own computation (its input quantizer), not the lookup
    handle = model.backbone.stem.input_quantizer.register_forward_hook(
        lambda *a: stem_calls.append(1))
    try:
        with torch.no_grad():
            result = tail.run(2)
            full = model(batches[2])
    finally:
        handle.remove()
    assert len(stem_calls) == 1  # only the full forward ran the stem
    for a, b in zip(result.outputs, full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert len(result.unit_outputs) == units[k].num_calls
    assert 'forward' not in model.backbone.__dict__  # patch removed
    set_quant_state(model, False, False)
    with torch.no_grad():
        fp = model(batches[2])
    for a, b in zip(tail.target(2), fp):
        torch.testing.assert_close(a, b)
    assert tail.seconds > 0 and tail.num_runs == 1
    tail.release()
    set_quant_state(model, True, True)


def _ctx(pred, target, **kw):
    kw.setdefault('fisher', None)
    return ReconContext(unit=SimpleNamespace(name='u'), pred=pred, target=target,
                        quantizers=kw.pop('q', []), iteration=kw.pop('it', 0),
                        total_iters=kw.pop('n', 100), **kw)


def test_output_and_fisher_losses():
    p, t = torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    assert OutputMSE()(_ctx([p], [t])).item() == pytest.approx(4.0)  # channel sum
    assert OutputMSE(reduction='mean')(_ctx([p], [t])).item() == pytest.approx(1.0)
    g = torch.zeros_like(p)
    g[:, 0] = 1.0
    assert FisherMSE()(_ctx([p], [t], fisher=[g])).item() == pytest.approx(4.0)
    p2 = p.clone()
    p2[:, 0] = 0
    assert FisherMSE()(_ctx([p2], [t], fisher=[g])).item() == 0.0
    # all-zero gradients (the loss does not see the unit): uniform weights = OutputMSE
    zero = torch.zeros_like(p)
    assert FisherMSE()(_ctx([p], [t], fisher=[zero])).item() == pytest.approx(
        OutputMSE()(_ctx([p], [t])).item())
    with pytest.raises(ValueError, match='no output gradients'):
        FisherMSE()(_ctx([p], [t]))
    with pytest.raises(ValueError, match='reduction'):
        OutputMSE(reduction='sum')


def test_rounding_regularizer_schedule():
    decay = LinearTempDecay(t_max=100, warmup=0.2, start_b=20, end_b=2)
    assert [decay(t) for t in (0, 19, 20, 60, 100)] == [20, 20, 20, 11, 2]

    class Q:
        def regularizer(self, beta):
            return torch.tensor(float(beta))

    reg = RoundingRegularizer(weight=0.01)
    x = [torch.zeros(1)]
    assert reg(_ctx(x, x, q=[Q()], it=10)).item() == 0.0
    assert reg(_ctx(x, x, q=[Q(), Q()], it=60)).item() == pytest.approx(0.22)


@pytest.mark.parametrize('sigmoid', [False, True])
def test_prediction_kl(sigmoid):
    gen = torch.Generator().manual_seed(0)
    fp = torch.randn(6, 5, generator=gen)
    kl = PredictionKL(sigmoid=sigmoid, temperature=4.0)
    assert kl(_ctx([fp], [fp], final_pred=fp, final_target=fp)).item() == pytest.approx(
        0.0, abs=1e-6)
    q = fp + torch.randn(6, 5, generator=gen)
    assert kl(_ctx([fp], [fp], final_pred=q, final_target=fp)).item() > 0
    with pytest.raises(ValueError, match=r'logits \[N, C\]'):
        kl(_ctx([fp], [fp], final_pred=q[None], final_target=fp[None]))
