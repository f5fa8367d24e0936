"""Reg-PTQ: FGIC filters and gradients (hand-made tensors), the method's switches on the toy
model, and a calibration of a random-init RetinaNet on two synthetic images."""
import copy
import logging
import math

import pytest
import torch
from calib_toy import forward_fn, make_batches, make_float, make_quant

from mmdet_regptq.calib import (DetPredictions, FGICConfig, FGICLoss, FisherMSE, GlobalLoss,
                                OutputMSE, ReconContext, RegPTQ, aligned_iou, fgic_loss,
                                fgic_mask, fgic_set_loss, output_mse)
from mmdet_regptq.quant import LLAQuantizer, iter_quant_modules, quantize_model
from mmdet_regptq.registry import PTQ_METHODS, build_from

pytestmark = pytest.mark.usefixtures('single_thread')

BOX = [0.0, 0.0, 10.0, 10.0]


def _preds(scores, boxes, sigmoid=True, shape=(100, 200), grad=False):
    return DetPredictions(torch.tensor(scores, requires_grad=grad),
                          torch.tensor(boxes, requires_grad=grad), shape, sigmoid)


# ---------------------------------------------------------------------- FGIC on tensors
def test_confidence_filter_uses_the_fp_max_score():
    fp = _preds([[0.5, 0.1], [1e-4, 1e-5], [3e-4, 0.0]], [BOX] * 3)
    q = _preds([[0.5, 0.1], [0.9, 0.9], [0.0, 0.0]], [BOX] * 3)
    assert fgic_mask(fp, q).tolist() == [True, False, True]     # theta_C = 2e-4 on FP only
    assert fgic_mask(fp, q, FGICConfig(conf_filter=False)).tolist() == [True] * 3
    assert fgic_mask(fp, q, FGICConfig(theta_c=0.2)).tolist() == [True, False, False]


def test_iou_filter_between_fp_and_quantized_box():
    shifted = [[9.0, 0.0, 19.0, 10.0], [5.0, 0.0, 15.0, 10.0], BOX]
    fp = _preds([[0.5]] * 3, [BOX] * 3)
    q = _preds([[0.5]] * 3, shifted)
    assert torch.allclose(aligned_iou(fp.boxes, q.boxes), torch.tensor([10 / 190, 50 / 150, 1]))
    assert fgic_mask(fp, q).tolist() == [False, True, True]     # theta_I = 0.1
    assert fgic_mask(fp, q, FGICConfig(iou_filter=False)).tolist() == [True] * 3
    both_off = FGICConfig(iou_filter=False, conf_filter=False)
    assert fgic_mask(_preds([[0.0]] * 3, [BOX] * 3), q, both_off).all()


def test_softmax_background_and_class_specific_boxes():
    # softmax heads: the last column is the background, left out of the confidence filter
    fp = _preds([[1e-4, 0.9999], [0.7, 0.3]], [[BOX, BOX], [BOX, BOX]], sigmoid=False)
    far = [30.0, 30.0, 40.0, 40.0]
    # class-specific boxes [N, K, 4]: compared at the FP model's top foreground class (0)
    q = _preds([[0.5, 0.5], [0.5, 0.5]], [[BOX, far], [BOX, far]], sigmoid=False)
    assert fgic_mask(fp, q).tolist() == [False, True]
    q_wrong_class = _preds([[0.5, 0.5]] * 2, [[far, BOX], [far, BOX]], sigmoid=False)
    assert fgic_mask(fp, q_wrong_class).tolist() == [False, False]


def test_loss_value_matches_the_formula():
    fp = _preds([[0.8, 0.1], [1e-5, 1e-5]], [BOX, BOX], shape=(10, 20))
    q = _preds([[0.6, 0.2], [0.3, 0.1]], [[1.0, 0.0, 10.0, 12.0], [0.0, 0.0, 10.0, 10.0]],
               shape=(10, 20))
    cfg = FGICConfig(lambda_=2.0, entropy_offset=False)

    def bce(y, p):
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    ce = [bce(0.8, 0.6) + bce(0.1, 0.2), bce(1e-5, 0.3) + bce(1e-5, 0.1)]
    box = 1.0 / 20 + 2.0 / 10                   # |dx1| / w + |dy2| / h, first box only
    expected = (ce[0] + ce[1] + 2.0 * box) / 2  # 1/n over both; the second is masked
    assert float(fgic_set_loss(fp, q, cfg)) == pytest.approx(expected, rel=1e-5)
    kl = float(fgic_set_loss(fp, q, FGICConfig(lambda_=2.0)))
    entropy = bce(0.8, 0.8) + bce(0.1, 0.1) + 2 * bce(1e-5, 1e-5)
    assert kl == pytest.approx(expected - entropy / 2, rel=1e-4)
    assert float(fgic_set_loss(fp, fp)) == pytest.approx(0.0, abs=1e-6)


def test_gradient_flows_into_the_quantized_side_only():
    fp = _preds([[0.8, 0.1], [0.5, 0.5]], [BOX, BOX], grad=True)
    q = _preds([[0.6, 0.2], [0.4, 0.4]], [[1.0, 0.0, 10.0, 12.0], [50.0, 50.0, 60.0, 60.0]],
               grad=True)
    loss = fgic_loss([fp, fp], [q, q])
    loss.backward()
    assert fp.scores.grad is None and fp.boxes.grad is None
    assert q.scores.grad.abs().sum() > 0
    assert q.boxes.grad[0].abs().sum() > 0                          # kept by the filter
    assert torch.equal(q.boxes.grad[1], torch.zeros(4))             # IoU 0: masked
    with pytest.raises(ValueError, match='same non-zero number'):
        fgic_loss([fp], [q, q])


def test_fgic_loss_callable_and_global_loss_term():
    def decode(raw):
        return {'a': [DetPredictions(raw[0], raw[1], (100, 100))],
                'b': [DetPredictions(raw[0], raw[1], (100, 100))]}

    fp = (torch.tensor([[0.9]]), torch.tensor([BOX]))
    q = (torch.tensor([[0.5]], requires_grad=True), torch.tensor([[1.0, 1.0, 11.0, 11.0]]))
    fn = FGICLoss(decode, dict(theta_i=0.05))
    assert fn.cfg.theta_i == 0.05
    value = fn(fp, q)
    assert float(value) == pytest.approx(2 * float(fgic_set_loss(*[
        DetPredictions(t[0], t[1], (100, 100)) for t in (fp, q)])), rel=1e-6)
    term = GlobalLoss(loss_fn=fn, weight=0.5)
    ctx = ReconContext(unit=None, pred=[], target=[], fisher=None, quantizers=[], iteration=0,
                       total_iters=1, final_pred=q, final_target=fp)
    assert float(term(ctx)) == pytest.approx(0.5 * float(value)) and term.seconds > 0
    assert GlobalLoss.needs_final_outputs


def test_global_loss_decodes_each_batch_target_once():
    """The FP side of one batch is the same at every iteration: decoded once per key,
    with the same value as decoding it every time."""
    calls = []

    def decode(raw):
        calls.append(raw[0] is fp[0])
        return {'det': [DetPredictions(raw[0], raw[1], (100, 100))]}

    fp = (torch.tensor([[0.9]]), torch.tensor([BOX]))
    other = (torch.tensor([[0.2]]), torch.tensor([[5.0, 5.0, 30.0, 30.0]]))
    fn = FGICLoss(decode)
    term = GlobalLoss(loss_fn=fn)
    values = []
    for it, (key, target) in enumerate([(0, fp), (0, fp), (1, other), (0, fp)]):
        q = (torch.tensor([[0.5]], requires_grad=True),
             torch.tensor([[1.0 + it, 1.0, 11.0, 11.0]]))
        ctx = ReconContext(unit=None, pred=[], target=[], fisher=None, quantizers=[],
                           iteration=it, total_iters=4, final_pred=q, final_target=target,
                           target_key=key)
        values.append(float(term(ctx)))
        assert values[-1] == pytest.approx(float(fn(target, q)))
    # 4 quantized decodes + 2 FP decodes (keys 0 and 1) by the term, + 8 by fn() above
    assert len(calls) == 4 + 2 + 8 and calls[:2] == [True, False]
    assert len(set(values)) == 4
    with pytest.raises(ValueError, match='unknown FGIC fields'):
        FGICConfig.from_cfg(dict(theta=1))
    with pytest.raises(ValueError, match='p=0.5'):
        FGICConfig(p=0.5)


# ---------------------------------------------------------------------- method switches
def test_switches_select_the_loss_terms_and_fgic_options():
    method = build_from(PTQ_METHODS, dict(type='RegPTQ', fgic=dict(
        conf_filter=False, theta_i=0.3, lambda_=0.5, p=2)), 'method')
    assert isinstance(method, RegPTQ) and method.drop_prob == 0.5 and method.needs_fisher()
    assert method.fgic == FGICConfig(lambda_=0.5, p=2.0, theta_i=0.3, conf_filter=False)
    terms = method.losses(None, output_fn=None, global_loss=output_mse)
    assert [type(t).__name__ for t in terms] == ['FisherMSE', 'RoundingRegularizer',
                                                 'GlobalLoss']
    local_only = RegPTQ(schedule=dict(global_loss=False, fisher=False))
    terms = local_only.losses(None, output_fn=None, global_loss=None)
    assert [type(t) for t in terms][0] is OutputMSE and not any(
        isinstance(t, (GlobalLoss, FisherMSE)) for t in terms)
    with pytest.raises(ValueError, match='needs calibrate\\(global_loss'):
        method.losses(None, output_fn=None, global_loss=None)
    with pytest.raises(ValueError, match="target='bogus'"):
        RegPTQ(llaq=dict(target='bogus'))
    assert RegPTQ().llaq.target == 'reg'
    assert RegPTQ(llaq=dict(target=None)).llaq_patterns() == []
    with pytest.raises(ValueError, match=r'needs llaq\.reg_layers'):
        RegPTQ().llaq_patterns()
    defaults = RegPTQ(llaq=dict(reg_layers=['x']))
    defaults.set_layer_defaults(head=['h'], regression=['r'])
    assert defaults.llaq.reg_layers == ['x'] and defaults.llaq.head_layers == ['h']


@pytest.mark.parametrize('llaq, expected', [('head', ['head.conv', 'head.cls']),
                                            ('reg', ['head.cls']), (None, [])])
def test_llaq_targets(llaq, expected):
    model = make_quant(make_float(), 3, 4)
    method = RegPTQ(llaq=dict(target=llaq, head_layers=[r'head\..*'], reg_layers=['head.cls'],
                              quantizer=dict(k_candidates=(1.0, 2.0))))
    assert method.install_llaq(model) == expected
    got = [n for n, m in iter_quant_modules(model) if isinstance(m.weight_quantizer, LLAQuantizer)]
    assert got == expected
    assert all(m.weight_quantizer.bits == 3 for n, m in iter_quant_modules(model) if n in got)


def test_calibrates_the_toy_with_llaq_fisher_and_the_global_term(caplog):
    float_model, batches = make_float(), make_batches(2)
    model = make_quant(float_model)
    method = RegPTQ(iters=2, progress=False, log_interval=0,
                    llaq=dict(target='head', head_layers=[r'head\..*']))
    logger = logging.getLogger('test_regptq')
    with caplog.at_level(logging.INFO, logger='test_regptq'):
        stats = method.calibrate(model, batches, forward_fn, global_loss=output_mse,
                                 logger=logger)
    assert len(stats) == 8 and all(math.isfinite(s.loss_after) for s in stats)
    assert all(0 < s.tail_share < 1 for s in stats)
    assert 'global term' in caplog.text
    head = dict(iter_quant_modules(model))['head.conv']
    assert isinstance(head.weight_quantizer, LLAQuantizer)
    with torch.no_grad():
        assert all(torch.isfinite(o).all() for o in model(batches[0]))
    with pytest.raises(ValueError, match='needs calibrate'):
        RegPTQ(iters=1, llaq=dict(target=None)).calibrate(make_quant(float_model), batches,
                                                          forward_fn)


@pytest.mark.parametrize('power_of_two', [True, False])
def test_power_of_two_llaq_keeps_k_at_one_and_has_a_shift_form(power_of_two):
    float_model, batches = make_float(), make_batches(2)
    model = make_quant(float_model)
    method = RegPTQ(iters=20, progress=False, log_interval=0,
                    llaq=dict(target='head', head_layers=[r'head\..*'],
                              quantizer=dict(power_of_two=power_of_two)))
    method.calibrate(model, batches, forward_fn, global_loss=output_mse)
    head = dict(iter_quant_modules(model))['head.conv']
    q = head.weight_quantizer
    weight = head.float_weight('weight')
    if power_of_two:   # a learned, k stays 1: every level a power of two, deployable as shifts
        assert torch.all(q.k_pos == 1) and torch.all(q.k_neg == 1)
        assert q.shift_form(weight) is not None
    else:              # k is trained too (SEARCH_K init), so the grid is not shifts
        assert q.shift_form(weight) is None


def test_learned_llaq_rounding_trains_and_hardens_the_choice_of_level():
    """llaq_rounding='learned': the LLAQ layers get LLAQRound, whose per-weight rounding
    is trained with the unit (some weights leave the nearest level) and hardened."""
    from mmdet_regptq.quant import LLAQRoundQuantizer
    float_model, batches = make_float(), make_batches(2)
    model = make_quant(float_model)
    method = RegPTQ(iters=40, progress=False, log_interval=0,
                    llaq=dict(target='head', head_layers=[r'head\..*']),
                    experimental=dict(llaq_rounding='learned'))
    method.calibrate(model, batches, forward_fn, global_loss=output_mse)
    layers = dict(iter_quant_modules(model))
    for name in ('head.conv', 'head.cls'):
        q = layers[name].weight_quantizer
        assert isinstance(q, LLAQRoundQuantizer) and q.hardened and not q.soft_targets
        weight = layers[name].float_weight('weight')
        nearest = LLAQRoundQuantizer(q.bits, k_candidates=q.k_candidates)
        nearest.load_state_dict(q.state_dict())
        nearest.init_from(weight)             # the nearest level under the init grid
        assert not torch.equal(nearest.base_level + (nearest.alpha >= 0).float(),
                               q.base_level + (q.alpha >= 0).float())
    with pytest.raises(ValueError, match="llaq_rounding='nearest' is unknown; allowed"):
        RegPTQ(experimental=dict(llaq_rounding='nearest'))


@pytest.mark.parametrize('w_bits,expected', [(2, 'LLAQRound'), (3, 'LLAQ'), (4, 'LLAQ')])
def test_auto_llaq_rounding_is_learned_at_two_bits_only(w_bits, expected):
    """The default llaq_rounding='auto' picks the quantizer type by the layer's weight bits
    (AUTO_LEARNED_MAX_BITS = 2); 'psi' and 'learned' ignore the bits."""
    from mmdet_regptq.calib.methods.regptq import AUTO_LEARNED_MAX_BITS
    assert RegPTQ().experimental.llaq_rounding == 'auto' and AUTO_LEARNED_MAX_BITS == 2
    model = make_quant(make_float(), w_bits=w_bits)
    method = RegPTQ(llaq=dict(target='head', head_layers=[r'head\.conv']))
    assert method.install_llaq(model) == ['head.conv']
    q = dict(iter_quant_modules(model))['head.conv'].weight_quantizer
    assert type(q).__name__ == ('LLAQRoundQuantizer' if expected == 'LLAQRound'
                                else 'LLAQuantizer') and q.bits == w_bits
    assert RegPTQ(experimental=dict(llaq_rounding='psi')).llaq_type(w_bits) == 'LLAQ'
    assert RegPTQ(experimental=dict(llaq_rounding='learned')).llaq_type(w_bits) == 'LLAQRound'


def _spy(monkeypatch, owner, name, record):
    """Replace ``owner.name`` by a wrapper that calls ``record(*args)``, then the original."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        record(*args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def _per_setting(group, option, values, records, **options):
    """RegPTQ (no LLAQ, output MSE as the global loss) on the toy model with 2 batches,
    once per value of ``group.option``: clears ``records``, yields ``(value, stats)``."""
    float_model, batches = make_float(), make_batches(2)
    for value in values:
        for record in records:
            record.clear()
        method = RegPTQ(progress=False, log_interval=0, llaq=dict(target=None),
                        **{group: {option: value}}, **options)
        stats = method.calibrate(make_quant(float_model), batches, forward_fn,
                                 global_loss=output_mse)
        assert all(math.isfinite(s.loss_after) for s in stats)
        yield value, stats


def test_global_interval_runs_the_tail_on_every_nth_iteration(monkeypatch):
    """global_interval=n: the tail (and L_G) on iterations 0, n, 2n, ... only; the other
    iterations still train on the local term."""
    from mmdet_regptq.calib import tail as tail_module
    runs, terms_seen = [], []
    _spy(monkeypatch, tail_module.TailRunner, 'run', lambda *a: runs.append(1))
    _spy(monkeypatch, GlobalLoss, '__call__', lambda self, ctx: terms_seen.append(ctx.iteration))
    per_interval = {}
    for interval, stats in _per_setting('schedule', 'global_interval', (1, 3),
                                        [runs, terms_seen], iters=7):
        per_interval[interval] = (len(runs), sorted(set(terms_seen)))
    units = len(stats)
    # + the capture's Fisher-gradient pass: one tail run per batch (2 batches); the
    # evaluations before and after the loop score the local terms (no tail run)
    assert per_interval[1][0] == units * (7 + 2)
    assert per_interval[3][0] == units * (3 + 2)      # iterations 0, 3, 6
    assert per_interval[3][1] == [0, 3, 6]
    with pytest.raises(ValueError, match='global_interval'):
        RegPTQ(schedule=dict(global_interval=0))


def test_local_draw_call_runs_one_call_on_iterations_without_the_tail(monkeypatch):
    """local_draw='call': the shared head conv (2 calls per batch) reconstructs from one
    cached call on the iterations without L_G, from both calls on the L_G iterations;
    'batch' runs both calls on every iteration."""
    from mmdet_regptq.calib.losses import FisherMSE
    seen = []   # (iteration, has final outputs, number of calls) of the head conv
    _spy(monkeypatch, FisherMSE, '__call__', lambda self, ctx: seen.append(
        (ctx.iteration, ctx.final_pred is not None, len(ctx.target)))
        if ctx.unit.name == 'head.conv' else None)
    per_draw = {}
    for draw, _ in _per_setting('experimental', 'local_draw', ('batch', 'call'), [seen],
                                iters=6, schedule=dict(global_interval=3)):
        per_draw[draw] = [s for s in seen if s[0] < 6 and (s[0] > 0 or s[1])]
    # iterations 0 and 3 run the tail (both calls); the evaluations (iteration 0, no
    # final outputs) are left out above
    assert per_draw['batch'] == [(i, i % 3 == 0, 2) for i in range(6)]
    assert per_draw['call'] == [(i, i % 3 == 0, 2 if i % 3 == 0 else 1) for i in range(6)]
    with pytest.raises(ValueError, match="local_draw='level'.*'batch', 'call'"):
        RegPTQ(experimental=dict(local_draw='level'))


def test_fisher_share_takes_later_units_gradients_from_one_pass(monkeypatch):
    """fisher_share=n: one Fisher-gradient pass (a tail forward + backward per batch) for
    every n units; the units in between get their weights from it and still train with
    FisherMSE on non-zero gradients."""
    from mmdet_regptq.calib import capture as capture_module
    from mmdet_regptq.calib.losses import FisherMSE
    passes, fisher_units = [], []

    def check_fisher(self, ctx):
        assert ctx.fisher is not None and any(g.abs().sum() > 0 for g in ctx.fisher)
        fisher_units.append(ctx.unit.name)

    _spy(monkeypatch, capture_module, '_output_grads', lambda *a: passes.append(a[1].name))
    _spy(monkeypatch, FisherMSE, '__call__', check_fisher)
    per_share = {}
    for share, stats in _per_setting('experimental', 'fisher_share', (1, 3),
                                     [passes, fisher_units], iters=2):
        assert sorted(set(fisher_units)) == sorted(s.unit for s in stats)
        per_share[share] = list(passes)
    names = [s.unit for s in stats]
    assert per_share[1] == [n for n in names for _ in range(2)]        # 2 batches
    assert per_share[3] == [n for n in names[::3] for _ in range(2)]
    with pytest.raises(ValueError, match='fisher_share'):
        RegPTQ(experimental=dict(fisher_share=0))


def test_max_tail_units_far_units_run_no_tail_and_share_fisher(monkeypatch, caplog):
    """schedule.max_tail_units=2 on the toy's 8 units: units 0-4 have more than 2 units
    after them (far): no L_G, no tail in their iterations, Fisher weights from one pass per
    2 far units (non-zero, FisherMSE still trains them); units 5-7 run as without the
    bound (own Fisher pass, L_G)."""
    from mmdet_regptq.calib import capture as capture_module
    from mmdet_regptq.calib.methods.base import is_far
    passes, global_units, fisher_units = [], [], []

    def check_fisher(self, ctx):
        assert ctx.fisher is not None and any(g.abs().sum() > 0 for g in ctx.fisher)
        fisher_units.append(ctx.unit.name)

    _spy(monkeypatch, capture_module, '_output_grads', lambda *a: passes.append(a[1].name))
    _spy(monkeypatch, GlobalLoss, '__call__', lambda self, ctx: global_units.append(
        ctx.unit.name))
    _spy(monkeypatch, FisherMSE, '__call__', check_fisher)
    method = RegPTQ(iters=4, progress=False, log_interval=0, llaq=dict(target=None),
                    schedule=dict(max_tail_units=2))
    logger = logging.getLogger('test_regptq_far')
    with caplog.at_level(logging.INFO, logger='test_regptq_far'):
        stats = method.calibrate(make_quant(make_float()), make_batches(2), forward_fn,
                                 global_loss=output_mse, logger=logger)
    assert all(math.isfinite(s.loss_after) for s in stats)
    names = [s.unit for s in stats]
    assert len(names) == 8 and [is_far(k, 8, 2) for k in range(8)] == [True] * 5 + [False] * 3
    near = names[5:]
    assert passes == [n for n in names[0:5:2] + near for _ in range(2)]   # 2 batches
    assert sorted(set(global_units)) == sorted(near)                       # L_G: near only
    assert sorted(set(fisher_units)) == sorted(names)
    assert all(s.tail_share == 0 for s in stats[:5]) and all(s.tail_share > 0 for s in stats[5:])
    assert caplog.text.count('far: shared Fisher pass, no L_G') == 5
    assert is_far(0, 8, None) is False


def test_max_tail_units_not_reached_is_bit_identical_to_unset():
    """A bound no unit exceeds (7 units after the first of 8) runs exactly the code without
    it: identical calibrated tensors."""
    float_model, batches = make_float(), make_batches(2)
    states = []
    for bound in (None, 7):
        torch.manual_seed(0)
        model = make_quant(float_model)
        RegPTQ(iters=3, progress=False, log_interval=0, llaq=dict(target=None),
               schedule=dict(global_interval=2, max_tail_units=bound)).calibrate(
            model, batches, forward_fn, global_loss=output_mse)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize('bound', [0, -1, True, 2.0, '8'])
def test_max_tail_units_is_checked_at_config_load(bound):
    with pytest.raises(ValueError, match=r'schedule: max_tail_units=.* allowed None .*int >= 1'):
        RegPTQ(schedule=dict(max_tail_units=bound))


def test_units_tail_fn_never_calls_reconstruct_local_only(monkeypatch, caplog):
    """With ``tail_fn`` (a forward without an auxiliary branch the global loss never reads,
    like Mask R-CNN's mask head), the branch's unit runs no tail: no TailRunner.prepare,
    no L_G, the plain output error instead of the Fisher one (its gradients are exactly
    zero) — and it is still trained and logged as local only."""
    from mmdet_regptq.calib import tail as tail_module
    from mmdet_regptq.calib.methods.base import local_only
    prepared = []
    original = tail_module.TailRunner.prepare
    monkeypatch.setattr(tail_module.TailRunner, 'prepare',
                        lambda self, unit, **kw: (prepared.append(unit.name),
                                                  original(self, unit, **kw)))

    class WithAux(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.toy = make_float()
            self.aux = torch.nn.Conv2d(3, 4, 3, padding=1)

    def full(m, b):
        return m.toy(b), m.aux(b)

    def without_aux(m, b):
        return m.toy(b), None

    def loss(fp, q):
        return output_mse(fp[0], q[0])

    torch.manual_seed(0)
    float_model, batches = WithAux().eval(), make_batches(2)
    model = copy.deepcopy(float_model)
    quantize_model(model, dict(w_bits=4, a_bits=4), example_forward=lambda m: full(m, batches[0]))
    method = RegPTQ(iters=3, progress=False, log_interval=0, llaq=dict(target=None))
    logger = logging.getLogger('test_regptq_local')
    with caplog.at_level(logging.INFO, logger='test_regptq_local'):
        stats = method.calibrate(model, batches, full, global_loss=loss, logger=logger,
                                 tail_fn=without_aux)
    by_name = {s.unit: s for s in stats}
    assert 'aux' in by_name and 'aux' not in prepared
    assert set(prepared) == set(by_name) - {'aux'}
    assert by_name['aux'].tail_share == 0 and math.isfinite(by_name['aux'].loss_after)
    assert all(by_name[n].tail_share > 0 for n in prepared)
    assert 'aux (layer' in caplog.text and 'local only' in caplog.text
    terms = local_only([FisherMSE(), GlobalLoss(loss_fn=loss)])
    assert [type(t) for t in terms] == [OutputMSE]
    with pytest.raises(ValueError, match='no local reconstruction term'):
        local_only([GlobalLoss(loss_fn=loss)])


# ---------------------------------------------------------------------- RetinaNet
@pytest.mark.slow
def test_regptq_calibrates_a_random_init_retinanet(synthetic_data, caplog):
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from mmdet_regptq.engine import build_calib_loader, quantize_detector
    from mmdet_regptq.models import find_adapter

    init_default_scope('mmdet')
    cfg = Config.fromfile('configs/synthetic/retinanet_r18-16_fpn64_synthetic.py')
    for step in cfg.test_dataloader.dataset.pipeline:   # 64x64: a quicker test
        if step['type'] == 'Resize':
            step['scale'] = (64, 64)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    loader = build_calib_loader(cfg, num_images=2, batch_size=2)
    logger = logging.getLogger('test_regptq_retinanet')
    with caplog.at_level(logging.INFO, logger=logger.name):
        result = quantize_detector(model, loader, quant=dict(w_bits=4, a_bits=4),
                                   method=dict(type='RegPTQ', iters=2, progress=False,
                                               log_interval=0), logger=logger)
    stats = result['stats']
    assert len(stats) == 22 and all(math.isfinite(s.loss_after) for s in stats)
    assert 'global term' in caplog.text
    llaq = [n for n, m in iter_quant_modules(model) if isinstance(m.weight_quantizer,
                                                                   LLAQuantizer)]
    assert llaq == ['bbox_head.reg_convs.0.conv', 'bbox_head.reg_convs.1.conv']
    adapter = find_adapter(model)
    batch = adapter.prepare_batch(next(iter(loader)))
    with torch.no_grad():
        raw = adapter.forward(model, batch)
    assert all(torch.isfinite(t).all() for level in raw.outputs for t in level)
    for pred in adapter.decode(raw):
        assert torch.isfinite(pred.scores).all() and torch.isfinite(pred.boxes).all()


@pytest.mark.parametrize('llaq_rounding', ['psi', 'learned'])
def test_resume_after_a_unit_gives_the_same_model(llaq_rounding):
    """A RegPTQ calibration stopped after unit 3 and resumed (LLAQ re-installed by
    restore_finished, the saved state loaded) ends with the uninterrupted run's tensors."""
    import copy
    float_model, batches = make_float(), make_batches(2)
    options = dict(iters=3, progress=False, log_interval=0,
                   llaq=dict(target='head', head_layers=[r'head\..*']),
                   experimental=dict(llaq_rounding=llaq_rounding))
    model, saved = make_quant(float_model), {}

    def on_unit_end(index, unit, stats):
        if index == 2:
            saved['state'] = copy.deepcopy(model.state_dict())

    method = RegPTQ(**options)
    method.init_scales(model, batches, forward_fn)
    method.calibrate(model, batches, forward_fn, global_loss=output_mse,
                     on_unit_end=on_unit_end)
    resumed = make_quant(float_model)
    method = RegPTQ(**options)
    method.restore_finished(resumed, method.find_units(resumed, forward_fn, batches[0]), 3)
    resumed.load_state_dict(saved['state'])
    stats = method.calibrate(resumed, batches, forward_fn, global_loss=output_mse,
                             start_unit=3)
    assert len(stats) == 5
    assert isinstance(dict(iter_quant_modules(resumed))['head.conv'].weight_quantizer,
                      LLAQuantizer)
    final, again = model.state_dict(), resumed.state_dict()
    assert final.keys() == again.keys()
    assert all(torch.equal(final[k], again[k]) for k in final)
