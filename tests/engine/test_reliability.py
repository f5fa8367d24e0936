"""Reliability of a calibration run: safe quantized / partial checkpoint loads, resume never
mixes FP weights, a finished quantized.pth is reused, NaN FP weights and checkpoints of
another detector stop the run before calibration, typos fail when the hook is built."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from engine_utils import FAST_METHOD, FAST_QUANT, REPO, build_detector, state_equal
from mmdet_regptq.engine import RegPTQHook, build_calib_loader
from mmdet_regptq.engine.checkpoint import check_fp_checkpoint
from mmdet_regptq.engine.ptq import quantize_detector
from mmdet_regptq.engine.resume import FINAL_NAME, PARTIAL_NAME, CalibrationResume
from mmdet_regptq.safe_load import UnsafeCheckpointError
from test_safe_load import FORMATS, assert_refused, write_evil   # tests/ is on sys.path

STOP_AFTER = 2


def _stop_after(k: int):
    def on_unit_end(index, unit, stats):
        if index + 1 == k:
            raise KeyboardInterrupt(f'stopped after unit {index + 1}')
    return on_unit_end


def _run(cfg, batches, seed_model=0, **kwargs):
    model = build_detector(cfg, seed=seed_model)
    result = quantize_detector(model, batches, quant=FAST_QUANT, method=FAST_METHOD, seed=0,
                               **kwargs)
    return model, result


# ------------------------------------------------------------------ safe loads (engine)
@pytest.mark.parametrize('fmt', FORMATS)
def test_quantized_checkpoint_argument_is_a_safe_load(tiny_cfg, tiny_batches, tmp_path, fmt):
    marker = tmp_path / 'PAYLOAD_RAN'
    path = tmp_path / f'evil_{fmt}.pth'
    name = write_evil(path, fmt, marker)
    with pytest.raises(UnsafeCheckpointError) as info:
        _run(tiny_cfg, tiny_batches, quantized_checkpoint=str(path))
    assert_refused(info.value, name, marker)


def test_malicious_partial_file_is_ignored(tmp_path, caplog):
    marker = tmp_path / 'PAYLOAD_RAN'
    name = write_evil(tmp_path / PARTIAL_NAME, 'legacy', marker)
    resume = CalibrationResume(tmp_path, {'seed': 0}, logging.getLogger('test.evil'))
    with caplog.at_level(logging.WARNING, logger='test.evil'):
        assert resume.load() is None
    assert_refused(caplog.text, name, marker)


# ------------------------------------------------------------------ resume and reuse
def test_resume_with_other_fp_weights_starts_fresh(tiny_cfg, tiny_batches, tmp_path, caplog):
    """A partial state of checkpoint A is never continued with checkpoint B."""
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_cfg, tiny_batches, work_dir=tmp_path, on_unit_end=_stop_after(STOP_AFTER))
    assert torch.load(tmp_path / PARTIAL_NAME)['num_finished'] == STOP_AFTER
    logger = logging.getLogger('test.weights')
    with caplog.at_level(logging.WARNING, logger='test.weights'):
        other, result = _run(tiny_cfg, tiny_batches, seed_model=1, work_dir=tmp_path,
                             logger=logger)
    assert result['resumed_from_unit'] == 0
    assert 'made with other FP weights (another checkpoint is loaded' in caplog.text
    fresh, _ = _run(tiny_cfg, tiny_batches, seed_model=1)
    assert state_equal(fresh.state_dict(), other.state_dict()) == []


def test_finished_quantized_pth_is_reused(tiny_cfg, tiny_batches, tmp_path, caplog):
    """A crash after calibration (e.g. during evaluation) costs only the evaluation."""
    first, result = _run(tiny_cfg, tiny_batches, work_dir=tmp_path)
    assert 'stats' in result
    logger = logging.getLogger('test.reuse')
    calls = []
    with caplog.at_level(logging.INFO, logger='test.reuse'):
        again, result = _run(tiny_cfg, tiny_batches, work_dir=tmp_path, logger=logger,
                             on_unit_end=lambda *a: calls.append(a))
    assert result['reused'] == str(tmp_path / FINAL_NAME) and 'stats' not in result
    assert calls == []                                     # no unit calibrated again
    assert 'reusing the finished calibration' in caplog.text
    with torch.no_grad():
        x = torch.rand(1, 3, 96, 96)
        assert all(torch.equal(a, b) for a, b in zip(
            _flat(first(x, mode='tensor')), _flat(again(x, mode='tensor'))))
    # other FP weights: not reused; recalibrate=True: not reused either
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='test.reuse'):
        _, result = _run(tiny_cfg, tiny_batches, seed_model=1, work_dir=tmp_path, logger=logger)
    assert 'reused' not in result and 'stats' in result
    assert 'not reusing' in caplog.text and 'other FP weights' in caplog.text
    _, result = _run(tiny_cfg, tiny_batches, seed_model=1, work_dir=tmp_path,
                     recalibrate=True)
    assert 'reused' not in result and 'stats' in result


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flat(item)]


# ------------------------------------------------------------------ FP weights / checkpoint
def test_nan_fp_weights_stop_before_calibration(tiny_cfg, tiny_batches):
    model = build_detector(tiny_cfg)
    with torch.no_grad():
        model.bbox_head.retina_reg.weight[0, 0, 0, 0] = float('inf')
    calls = []
    with pytest.raises(FloatingPointError, match=r"NaN/Inf values in 'bbox_head\.retina_reg"
                                                 r"\.weight' before calibration: the "
                                                 'checkpoint loaded into the detector is '
                                                 'broken'):
        quantize_detector(model, tiny_batches, quant=FAST_QUANT, method=FAST_METHOD,
                          on_unit_end=lambda *a: calls.append(a))   # save=False: no work_dir
    assert calls == []


def test_checkpoint_of_another_detector_stops_calibration(tiny_cfg, tmp_path):
    model = build_detector(tiny_cfg)
    state = model.state_dict()
    state.pop('bbox_head.retina_reg.bias')
    state['bbox_head.retina_cls.weight'] = torch.zeros(3, 64, 3, 3)
    state['roi_head.fc.weight'] = torch.zeros(1)
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in state.items()}}, path)
    with pytest.raises(ValueError) as info:
        check_fp_checkpoint(model, path)
    text = str(info.value)
    for part in ("1 missing key(s) ['bbox_head.retina_reg.bias']",
                 "1 unexpected key(s) ['roi_head.fc.weight']",
                 'bbox_head.retina_cls.weight: (3, 64, 3, 3) in the checkpoint'):
        assert part in text, text
    log = tmp_path / 'warn.log'
    from mmengine.logging import MMLogger
    logger = MMLogger.get_instance('test_fp_ckpt', log_file=str(log))
    assert len(check_fp_checkpoint(model, path, strict=False, logger=logger)) == 3
    assert 'roi_head.fc.weight' in log.read_text()
    # the bundled checkpoint of this config fits
    bundled = REPO / 'checkpoints' / 'retinanet_r18-16_fpn64_synthetic.pth'
    assert check_fp_checkpoint(model, bundled) == []


def test_hook_checks_load_from_before_calibrating(tiny_cfg, tmp_path):
    from types import SimpleNamespace
    model = build_detector(tiny_cfg)
    fcos = REPO / 'checkpoints' / 'fcos_r18-16_fpn64_synthetic.pth'
    runner = SimpleNamespace(model=model, _load_from=str(fcos), cfg=tiny_cfg,
                             logger=logging.getLogger('test.hook'), work_dir=str(tmp_path))
    hook = RegPTQHook(quant=FAST_QUANT, method=FAST_METHOD)
    with pytest.raises(ValueError, match=r'does not fit the RetinaNet of this config: \d+ '
                                         r'missing key\(s\) \[.*unexpected key\(s\)'):
        hook.before_test(runner)
    assert not getattr(model, '_regptq_quantized', False)


# ------------------------------------------------------------------ user input
@pytest.mark.parametrize('strict', [True, False])
def test_unmatched_regex(tiny_cfg, tiny_batches, tmp_path, strict):
    quant = dict(FAST_QUANT, overrides={r'bbox_head\.reg_conv\.0\.conv': dict(w_bits=8)},
                 fp_layers=[r'neck\.fpn_convs\.0\.conv'])   # typo ('reg_convs'), and a match
    if strict:
        with pytest.raises(ValueError, match=r"matching no quantizable layer: \['overrides: "
                                             r"bbox_head\\\\.reg_conv\\\\.0\\\\.conv'\]"):
            quantize_detector(build_detector(tiny_cfg), tiny_batches, quant=quant,
                              method=FAST_METHOD)
        return
    from mmengine.logging import MMLogger
    log = tmp_path / 'run.log'
    logger = MMLogger.get_instance('test_unmatched', log_file=str(log))
    quantize_detector(build_detector(tiny_cfg), tiny_batches, quant=quant,
                      method=dict(type='MinMax', progress=False), strict=False, logger=logger)
    text = log.read_text()
    assert 'matching no quantizable layer' in text and 'reg_conv' in text
    assert 'fpn_convs' not in text.split('matching no quantizable layer')[1].splitlines()[0]


def test_calib_dataset_without_pipeline_gets_the_test_pipeline(tiny_cfg):
    dataset = copy.deepcopy(tiny_cfg.train_dataloader.dataset.to_dict())
    dataset.pop('pipeline')
    loader = build_calib_loader(tiny_cfg, num_images=2, dataloader=dict(dataset=dataset))
    batch = next(iter(loader))
    assert [tuple(img.shape[-2:]) for img in batch['inputs']] == [(96, 96)] * 2
    cfg = copy.deepcopy(tiny_cfg)
    cfg.test_dataloader = None
    with pytest.raises(ValueError, match=r'calib: calib\.dataloader\.dataset needs a pipeline '
                                         r'and the config has no test_dataloader'):
        build_calib_loader(cfg, num_images=2, dataloader=dict(dataset=dataset))


@pytest.mark.parametrize('kwargs,error,pattern', [
    (dict(method=dict(type='QDrop', itres=10)), KeyError,
     r"method: unknown option\(s\) \['itres'\] for QDrop; allowed: \[.*'iters'"),
    (dict(method=dict(type='RegPTQ', lllaq='reg')), KeyError,
     r"unknown option\(s\) \['lllaq'\] for RegPTQ; allowed: \[.*'llaq'"),
    (dict(method=dict(type='QDrop', drop_prob=2.0)), ValueError, r'drop_prob=2\.0 is out of'),
    (dict(method=dict(type='QDropp')), KeyError, r"method\.type='QDropp' is unknown"),
    (dict(quant=dict(w_bits=9)), ValueError, r'w_bits=9 is out of range; allowed 2\.\.8'),
    (dict(quant=dict(wbits=4)), KeyError, r"quant: unknown field\(s\) \['wbits'\]"),
    (dict(calib=dict(num_images=0)), ValueError, r'calib\.num_images=0 must be an int >= 1'),
    (dict(calib=dict(batch_size='2')), ValueError, r"calib\.batch_size='2' must be an int"),
    (dict(calib=dict(images=8)), KeyError, r"calib: unknown field\(s\) \['images'\]"),
    (dict(strict='yes'), TypeError, r"strict='yes' must be True or False"),
])
def test_hook_validates_its_arguments_when_built(kwargs, error, pattern):
    """Errors at config load (the hook is built), not in before_test."""
    with pytest.raises(error, match=pattern):
        RegPTQHook(**kwargs)


def test_hook_built_from_a_config_fails_at_build(tiny_cfg):
    from mmdet.registry import HOOKS
    with pytest.raises(KeyError, match=r"unknown option\(s\) \['itres'\]"):
        HOOKS.build(dict(type='RegPTQHook', method=dict(type='QDrop', itres=10)))
