"""The calibration's shortcuts change no number: prefix stores extended from the previous
unit's, the FP pass started from the stored FP prefix, the FP targets decoded once.

Each test runs the shortcut and the full computation it replaces on the toy model and
compares the values (losses, gradients, calibrated tensors) exactly.
"""
import contextlib
import copy

import pytest
import torch
from calib_toy import forward_fn, make_batches, make_float, make_quant, output_fn

from mmdet_regptq.calib import (DetPredictions, FGICLoss, RegPTQ, TailRunner, find_units,
                                output_mse)
from mmdet_regptq.calib.tail import TailRunner as _Runner
from mmdet_regptq.quant import init_activation_quantizers

pytestmark = pytest.mark.usefixtures('single_thread')


def _full_prepare(monkeypatch):
    """The calibration as before the shortcuts: every prefix from a full pass, no FP
    prefix (so capture runs its FP pass from the input), the FP targets decoded at each
    use."""
    prepare = _Runner.prepare

    def full(self, unit, *, reuse=False, fp_prefix=False):
        return prepare(self, unit)

    monkeypatch.setattr(_Runner, 'prepare', full)
    monkeypatch.setattr(_Runner, 'decoded_target',
                        lambda self, index, loss_fn: loss_fn.decode_target(self.target(index)))


def toy_decode(raw):
    """Toy FGIC decoding: sigmoid scores and boxes built from the first 4 logits."""
    logits = output_fn(raw)
    corner = logits[:, :2] * 4
    boxes = torch.cat([corner, corner + logits[:, 2:4].exp() * 4], dim=1)
    return {'toy': [DetPredictions(logits.sigmoid(), boxes, (16, 16), True)]}


def _stores(tail):
    out = []
    for cache in (tail._prefix, tail._fp_prefix):
        out.append(None if cache is None else [cache[b].output for b in range(len(cache))])
    return out


def _assert_same_tree(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tree(x, y)
    else:
        assert a == b


def _fp_units():
    """The toy model with its activation ranges set, 3 batches, and its units, all in FP."""
    batches = make_batches(3)
    model = make_quant(make_float())
    init_activation_quantizers(model, lambda: [model(b) for b in batches])
    units = find_units(model, forward_fn, batches[0])
    for unit in units:
        unit.set_quant(False)
    return model, batches, units


def test_extended_prefix_equals_a_full_prefix_pass(monkeypatch):
    model, batches, units = _fp_units()
    stem = units[0].module
    calls = []
    stem_forward = type(stem).forward

    def counted(self, *args, **kwargs):
        calls.append(self is stem)
        return stem_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(stem), 'forward', counted)
    incremental = TailRunner(model, forward_fn, batches)
    for k, unit in enumerate(units):
        calls.clear()
        incremental.prepare(unit, reuse=True, fp_prefix=True)
        if k >= 2:   # the stem's output is looked up, not recomputed
            assert not any(calls)
        full = TailRunner(model, forward_fn, batches)
        full.prepare(unit, fp_prefix=True)
        _assert_same_tree(_stores(incremental), _stores(full))
        assert incremental._stored_prefix[2] == full._stored_prefix[2]
        with torch.no_grad():   # a tail run reads the same outputs
            _assert_same_tree(incremental.run(1).outputs, full.run(1).outputs)
        full.release()
        unit.set_quant(True)    # as calibration: the unit is quantized before the next
    incremental.release()


@pytest.mark.parametrize('options', [
    dict(),                                                    # the defaults
    dict(schedule=dict(global_interval=1)),                    # L_G every iteration
    dict(experimental=dict(local_draw='call', fisher_share=2)),
])
@pytest.mark.parametrize('fgic', [False, True])
def test_regptq_calibration_is_unchanged_by_the_shortcuts(monkeypatch, options, fgic):
    """Same seed, old and new code path: the same loss values at every iteration and the
    same calibrated tensors (bit for bit)."""
    float_model, batches = make_float(), make_batches(3)
    runs = []
    for shortcut in (False, True):
        global_loss = FGICLoss(toy_decode) if fgic else output_mse
        with monkeypatch.context() as patch:
            if not shortcut:
                _full_prepare(patch)
            losses = []
            grads = []
            backward = torch.Tensor.backward

            def recording(self, *args, **kwargs):
                losses.append(self.detach().clone())
                out = backward(self, *args, **kwargs)
                return out

            patch.setattr(torch.Tensor, 'backward', recording)
            model = make_quant(float_model)
            method = RegPTQ(iters=6, progress=False, log_interval=0,
                            llaq=dict(target='head', head_layers=[r'head\..*']), **options)
            stats = method.calibrate(model, batches, forward_fn, global_loss=global_loss)
            runs.append((losses, [(s.loss_before, s.loss_after) for s in stats],
                         copy.deepcopy(model.state_dict())))
    (loss_a, stats_a, state_a), (loss_b, stats_b, state_b) = runs
    assert len(loss_a) == len(loss_b) > 0
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b))
    assert stats_a == stats_b
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_fp_targets_are_decoded_once_per_calibration(monkeypatch):
    float_model, batches = make_float(), make_batches(3)
    decoded = []

    def counting(raw):
        if not torch.is_grad_enabled():   # the FP side (decode_target runs without grad)
            decoded.append(1)
        return toy_decode(raw)

    model = make_quant(float_model)
    method = RegPTQ(iters=4, progress=False, log_interval=0, llaq=dict(target=None),
                    schedule=dict(global_interval=1))
    stats = method.calibrate(model, batches, forward_fn, global_loss=FGICLoss(counting))
    assert len(stats) == 8
    assert len(decoded) == len(batches)    # not once per unit and batch


@pytest.mark.parametrize('llaq', [False, True])
def test_shared_weights_keep_the_loss_and_the_gradients(llaq):
    """A layer called on both toy levels quantizes its weight once per iteration: the
    same outputs and loss, gradients equal up to float rounding, one quantizer call."""
    from mmdet_regptq.calib.reconstruct import shared_weights
    float_model, batches = make_float(), make_batches(2)
    model = make_quant(float_model)
    init_activation_quantizers(model, lambda: [model(b) for b in batches])
    method = RegPTQ(iters=1, llaq=dict(target='head' if llaq else None,
                                       head_layers=[r'head\.conv']))
    method.install_llaq(model)
    unit = next(u for u in find_units(model, forward_fn, batches[0]) if u.name == 'head.conv')
    assert unit.num_calls == 2
    groups = method.prepare_unit(unit)
    params = [p for g in groups for p in g.params]
    quantizer = unit.module.weight_quantizer
    calls = []
    quantizer.register_forward_hook(lambda *a: calls.append(1))
    inputs = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)]
    results = []
    for shared in (False, True):
        calls.clear()
        for p in params:
            p.grad = None
        with shared_weights(unit) if shared else contextlib.nullcontext():
            outputs = [unit(x) for x in inputs]
        loss = sum((o ** 2).mean() for o in outputs)
        loss.backward()
        results.append((len(calls), [o.detach() for o in outputs], loss.detach(),
                        [p.grad.clone() for p in params if p.grad is not None]))
    (calls_a, out_a, loss_a, grads_a), (calls_b, out_b, loss_b, grads_b) = results
    assert (calls_a, calls_b) == (2, 1)
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b)) and torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert 'quantized_weight' not in unit.module.__dict__   # the patch is gone


def test_fp_prefix_is_dropped_once_it_spills(tmp_path):
    """Past the memory budget the FP prefix is not kept: the capture's FP pass then runs
    from the input, with the same values."""
    model, batches, units = _fp_units()
    tail = TailRunner(model, forward_fn, batches, max_bytes=4096, spill_dir=str(tmp_path))
    tail.prepare(units[-1], reuse=True, fp_prefix=True)
    assert not tail.has_fp_prefix and tail._fp_prefix_spilled
    roomy = TailRunner(model, forward_fn, batches)
    roomy.prepare(units[-1], reuse=True, fp_prefix=True)
    assert roomy.has_fp_prefix
    _assert_same_tree(_stores(tail)[0], _stores(roomy)[0])
    tail.release()
    roomy.release()
