"""PTQ methods on the toy model: every method runs, training lowers the error, QDrop beats
MinMax, determinism, resume, clear errors."""
import copy
import math

import pytest
import torch
from calib_toy import forward_fn, make_batches, make_float, make_quant, output_fn, output_mse

from mmdet_regptq.calib import (ActivationCache, OptimGroup, PTQMethod, ReconLoss,
                                capture_unit, find_units, reconstruct)
from mmdet_regptq.quant import init_activation_quantizers
from mmdet_regptq.registry import PTQ_METHODS, build_from

# few iterations; a larger rounding lr than the paper's 1e-3 so that 50 steps matter
FAST = dict(iters=50, lr_alpha=1e-2, progress=False, log_interval=0)

pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def float_model():
    return make_float()


@pytest.fixture(scope='module')
def batches():
    return make_batches()


def _calibrate(float_model, batches, cfg, w_bits=4, a_bits=4, **kwargs):
    model = make_quant(float_model, w_bits, a_bits)
    method = build_from(PTQ_METHODS, cfg, 'method')
    stats = method.calibrate(model, batches, forward_fn, **kwargs)
    return model, stats


@pytest.mark.parametrize('name', ['MinMax', 'MSE', 'AdaRound', 'AdaQuant', 'BRECQ', 'QDrop',
                                  'PDQuant'])
def test_every_method_calibrates_w4a4(float_model, batches, name):
    cfg = dict(type=name) if name in ('MinMax', 'MSE') else dict(type=name, **FAST)
    if name == 'PDQuant':   # the engine sets it from the adapter; the toy's maps: softmax
        cfg.update(sigmoid=False, dc_iters=20)
    model, stats = _calibrate(float_model, batches, cfg, output_fn=output_fn)
    assert math.isfinite(output_mse(model, float_model, batches))
    assert all(m.quant_weight and m.quant_input for m in model.modules()
               if hasattr(m, 'quant_weight'))
    if name in ('MinMax', 'MSE'):
        assert stats == []
        return
    assert len(stats) == (10 if name in ('AdaRound', 'AdaQuant') else 8)
    if name == 'PDQuant':
        assert all(0 < s.tail_share < 1 for s in stats)
    if name in ('AdaRound', 'BRECQ', 'QDrop'):
        better = sum(s.loss_after < s.loss_before for s in stats)
        assert better >= 0.75 * len(stats), [(s.unit, s.loss_before, s.loss_after)
                                             for s in stats]


def test_brecq_fisher_uses_output_gradients(float_model, batches):
    model, stats = _calibrate(float_model, batches, dict(type='BRECQ', fisher=True, **FAST))
    assert len(stats) == 8 and all(math.isfinite(s.loss_after) for s in stats)


def test_qdrop_w3a3_beats_minmax(float_model, batches):
    minmax, _ = _calibrate(float_model, batches, dict(type='MinMax'), 3, 3)
    qdrop, _ = _calibrate(float_model, batches, dict(type='QDrop', **FAST), 3, 3)
    assert output_mse(qdrop, float_model, batches) < output_mse(minmax, float_model, batches)


def test_same_seed_same_quantized_model(float_model, batches):
    a, _ = _calibrate(float_model, batches, dict(type='QDrop', **FAST), seed=3)
    b, _ = _calibrate(float_model, batches, dict(type='QDrop', **FAST), seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_from_a_unit_checkpoint(float_model, batches):
    saved = {}
    model = make_quant(float_model)

    def on_unit_end(index, unit, stats):
        saved.setdefault('indices', []).append(index)
        if index == 2:
            saved['state'] = copy.deepcopy(model.state_dict())

    method = build_from(PTQ_METHODS, dict(type='QDrop', **FAST), 'method')
    method.calibrate(model, batches, forward_fn, on_unit_end=on_unit_end)
    assert saved['indices'] == list(range(8))
    resumed = make_quant(float_model)
    method = build_from(PTQ_METHODS, dict(type='QDrop', **FAST), 'method')
    method.restore_finished(resumed, method.find_units(resumed, forward_fn, batches[0]), 3)
    resumed.load_state_dict(saved['state'])
    stats = method.calibrate(resumed, batches, forward_fn, start_unit=3)
    assert [s.unit for s in stats][0] == 'backbone.layer2'
    final, again = model.state_dict(), resumed.state_dict()
    assert all(torch.equal(final[k], again[k]) for k in final)


class _NaNAt(ReconLoss):
    def __call__(self, ctx):
        value = ctx.pred[0].sum() * 0
        return value + float('nan') if ctx.iteration == 3 else value


def test_non_finite_loss_names_unit_and_iteration(float_model, batches):
    model = make_quant(float_model)
    init_activation_quantizers(model, lambda: [model(b) for b in batches])
    unit = find_units(model, forward_fn, batches[0])[0]
    cache = capture_unit(model, unit, batches, forward_fn, ActivationCache())
    scales = [unit.module.input_quantizer.scale]
    with pytest.raises(FloatingPointError, match=r"'backbone.stem'.* iteration 3/10"):
        reconstruct(unit, cache, iters=10, losses=[_NaNAt()],
                    param_groups=[OptimGroup('act', scales, 1e-3)])


def test_unknown_method_lists_allowed_names():
    with pytest.raises(KeyError, match=r"method.type='Nope' is unknown.*'QDrop'"):
        build_from(PTQ_METHODS, dict(type='Nope'), 'method')


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match='drop_prob'):
        build_from(PTQ_METHODS, dict(type='QDrop', drop_prob=1.5), 'method')
    with pytest.raises(ValueError, match='iters'):
        build_from(PTQ_METHODS, dict(type='BRECQ', iters=-1), 'method')
    assert isinstance(build_from(PTQ_METHODS, dict(type='PDQuant'), 'method'), PTQMethod)


def test_scale_only_methods_refuse_iterations():
    assert build_from(PTQ_METHODS, dict(type='MinMax', iters=0), 'method').iters == 0
    with pytest.raises(ValueError, match='MSE trains nothing: iters=100'):
        build_from(PTQ_METHODS, dict(type='MSE', iters=100), 'method')
