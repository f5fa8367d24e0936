"""Reg-PTQ's parts that must keep working: LLAQ's k / a train during calibrate, L_G alone
reaches every trained parameter, the FGIC filter keeps and drops the right predictions, and
its kept fraction is logged per unit."""
import copy
import logging

import pytest
import torch
from calib_toy import forward_fn, make_batches, make_float, make_quant, output_fn

from mmdet_regptq.calib import (DetPredictions, FGICConfig, FGICLoss, GlobalLoss, RegPTQ,
                                TailRunner, capture_unit, fgic_mask, fgic_set_loss, find_units,
                                output_mse)
from mmdet_regptq.calib.cache import ActivationCache
from mmdet_regptq.calib.fgic import FilterCounts
from mmdet_regptq.calib.reconstruct import _Loop
from mmdet_regptq.quant import LLAQuantizer, iter_quant_modules, set_quant_state

pytestmark = pytest.mark.usefixtures('single_thread')

HEAD = dict(target='head', head_layers=[r'head\..*'])


def _llaq_state(model):
    return {name: [p.detach().clone() for p in layer.weight_quantizer.trainable_parameters()]
            for name, layer in iter_quant_modules(model)
            if isinstance(layer.weight_quantizer, LLAQuantizer)}


def test_llaq_k_and_a_train_during_calibrate(monkeypatch):
    """Dropping LLAQ's optimiser group (or its lr) leaves k / a at their init: this fails."""
    float_model, batches = make_float(), make_batches(2)
    model = make_quant(float_model, w_bits=3, a_bits=4)
    method = RegPTQ(iters=30, progress=False, log_interval=0, llaq=HEAD)
    before = {}
    original = RegPTQ.prepare_unit

    def prepare_unit(self, unit):
        groups = original(self, unit)
        for name, layer in unit.layers:
            if isinstance(layer.weight_quantizer, LLAQuantizer):
                before[name] = [p.detach().clone()
                                for p in layer.weight_quantizer.trainable_parameters()]
                assert any(g.name == 'llaq' for g in groups)
        return groups

    monkeypatch.setattr(RegPTQ, 'prepare_unit', prepare_unit)
    method.calibrate(model, batches, forward_fn, global_loss=output_mse)
    after = _llaq_state(model)
    assert set(before) == {'head.conv', 'head.cls'} == set(after)
    for name in before:
        k_pos, a_pos, k_neg, a_neg = after[name]
        moved = [not torch.equal(b, a) for b, a in zip(before[name], after[name])]
        assert all(moved), (name, moved)     # k+, a+, k-, a- each changed


def _head_unit_loop(model, batches, name, method):
    """A prepared reconstruction of unit ``name`` with only ``L_G`` as its loss."""
    units = method.find_units(model, forward_fn, batches[0])
    method.init_scales(model, batches, forward_fn)
    unit = {u.name: u for u in units}[name]
    set_quant_state(model, weight=False, input=False)
    for u in units[:units.index(unit)]:
        u.set_quant(True)
    tail = TailRunner(model, forward_fn, batches)
    tail.prepare(unit)
    cache = capture_unit(model, unit, batches, forward_fn, ActivationCache(), fp_inputs=True,
                         tail=tail)
    groups = method.prepare_unit(unit)
    unit.set_quant(True)
    term = GlobalLoss(loss_fn=output_mse)
    loop = _Loop(unit, cache, [term], tail, 0.5, torch.device('cpu'), 10)
    for q in loop.quantizers:
        q.soft_targets = True
    return unit, groups, loop, term


@pytest.mark.parametrize('name,expected', [('neck.lat2', {'alpha', 'act_scale'}),
                                           ('head.conv', {'act_scale', 'llaq'})])
def test_global_loss_alone_reaches_rounding_act_steps_and_llaq(name, expected):
    float_model, batches = make_float(), make_batches(2)
    model = make_quant(float_model, w_bits=3, a_bits=4)
    method = RegPTQ(iters=10, progress=False, log_interval=0,
                    llaq=dict(HEAD, head_layers=[r'head\.conv']))
    unit, groups, loop, term = _head_unit_loop(model, batches, name, method)
    assert {g.name for g in groups if g.params} == expected
    ctx = loop.context(0, 5, mix=True)
    value = term(ctx)
    params = [p for g in groups for p in g.params]
    grads = iter(torch.autograd.grad(value, params, allow_unused=True))
    for group in groups:
        got = [next(grads) for _ in group.params]
        assert all(g is not None and g.abs().sum() > 0 for g in got), group.name


# ---------------------------------------------------------------------- FGIC filter
BOX = [0.0, 0.0, 10.0, 10.0]


def _preds(scores, boxes):
    return DetPredictions(torch.tensor(scores), torch.tensor(boxes, requires_grad=True),
                          (100, 100), True)


def test_filter_thresholds_are_inclusive_and_drop_below():
    cfg = FGICConfig()
    theta_c, theta_i = cfg.theta_c, cfg.theta_i
    # confidence: exactly theta_C is kept, just below is dropped (max over classes)
    fp = _preds([[theta_c, 0.0], [0.0, theta_c * 0.999], [0.0, 0.5]], [BOX] * 3)
    assert fgic_mask(fp, fp, cfg).tolist() == [True, False, True]
    # IoU: boxes shifted so that IoU is just above / below theta_I
    def shifted(iou):   # same-size 10x10 boxes shifted in x: IoU = (10-d)/(10+d)
        d = 10 * (1 - iou) / (1 + iou)
        return [d, 0.0, 10.0 + d, 10.0]
    fp = _preds([[0.5]] * 2, [BOX] * 2)
    q = _preds([[0.5]] * 2, [shifted(theta_i + 1e-3), shifted(theta_i - 1e-3)])
    assert fgic_mask(fp, q, cfg).tolist() == [True, False]
    counts = FilterCounts()
    fgic_mask(fp, q, cfg, counts)
    assert (counts.total, counts.confident, counts.kept) == (2, 2, 1)


def test_dropped_predictions_get_no_box_gradient_kept_ones_do():
    fp = _preds([[0.5], [1e-5], [0.5]], [BOX] * 3)
    q = _preds([[0.5], [0.5], [0.5]], [[1.0, 0.0, 11.0, 10.0], [1.0, 0.0, 11.0, 10.0],
                                       [60.0, 60.0, 70.0, 70.0]])
    counts = FilterCounts()
    fgic_set_loss(fp, q, FGICConfig(), counts).backward()
    grad = q.boxes.grad.abs().sum(1)
    assert grad[0] > 0                       # kept: confident, IoU 0.82
    assert grad[1] == 0 and grad[2] == 0     # dropped: low confidence / IoU 0
    assert (counts.total, counts.confident, counts.kept) == (3, 2, 1)
    off = FGICConfig(conf_filter=False, iou_filter=False)
    q.boxes.grad = None
    fgic_set_loss(fp, q, off).backward()
    assert (q.boxes.grad.abs().sum(1) > 0).all()


def _toy_decode(raw):
    """Toy head maps → per image sigmoid scores and boxes that move with the logits."""
    logits = output_fn(raw)
    n = logits.shape[0]
    grid = torch.arange(n, dtype=logits.dtype)[:, None] % 16
    boxes = torch.cat([grid + 20 * logits[:, :2], grid + 8 + 20 * logits[:, 2:4]], dim=1)
    return {'dense': [DetPredictions((10 * logits[:, 4:]).sigmoid(), boxes, (16, 16), True)]}


@pytest.mark.parametrize('filters', [True, False])
def test_kept_fraction_is_logged_per_unit(caplog, filters):
    float_model, batches = make_float(), make_batches(2)
    model = make_quant(float_model)
    fgic = dict(theta_c=0.5, theta_i=0.9, conf_filter=filters, iou_filter=filters)
    method = RegPTQ(iters=3, progress=False, log_interval=0, llaq=dict(target=None),
                    fgic=fgic)
    logger = logging.getLogger('test_regptq_internals')
    with caplog.at_level(logging.INFO, logger='test_regptq_internals'):
        stats = method.calibrate(model, batches, forward_fn,
                                 global_loss=FGICLoss(_toy_decode, method.fgic), logger=logger)
    lines = [r.getMessage() for r in caplog.records if 'FGIC filter kept' in r.getMessage()]
    assert len(lines) == len(stats) == 8
    fractions = [float(line.split('kept ')[1].split('%')[0]) for line in lines]
    if filters:
        assert all(0 < f < 100 for f in fractions), lines
    else:
        assert all(f == 100 for f in fractions), lines
    assert all(s.notes and 'FGIC filter kept' in s.notes[0] for s in stats)
