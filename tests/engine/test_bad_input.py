"""Bad input gets a clear error naming the field and the allowed values; NaN/Inf during
calibration stops it and never reaches a checkpoint."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from engine_utils import FAST_METHOD, FAST_QUANT, build_detector
from mmdet_regptq.engine import RegPTQHook, build_calib_loader
from mmdet_regptq.engine.ptq import quantize_detector
from mmdet_regptq.quant import QuantPolicy


def _quantize(cfg, batches, *, quant=FAST_QUANT, method=FAST_METHOD, **kwargs):
    return quantize_detector(build_detector(cfg), batches, quant=quant, method=method, **kwargs)


@pytest.mark.parametrize('field,value,allowed', [
    ('w_bits', 9, '2..8'), ('w_bits', 1, '2..8'), ('w_bits', 4.5, '2..8'),
    ('a_bits', 17, '2..16'), ('a_bits', 1, '2..16'), ('first_layer_bits', 9, '2..8'),
])
def test_bits_out_of_range(tiny_cfg, tiny_batches, field, value, allowed):
    with pytest.raises(ValueError, match=rf'{field}={value!r} is out of range; allowed {allowed}'):
        _quantize(tiny_cfg, tiny_batches, quant=dict(FAST_QUANT, **{field: value}))


def test_bits_at_the_limits_are_accepted():
    QuantPolicy(w_bits=2, a_bits=16)
    QuantPolicy(w_bits=8, a_bits=2)


def test_unknown_method(tiny_cfg, tiny_batches):
    with pytest.raises(KeyError, match=r"method\.type='RegPTQv2' is unknown; allowed: \[.*'QDrop'"):
        _quantize(tiny_cfg, tiny_batches, method=dict(type='RegPTQv2'))


def test_unknown_quantizer(tiny_cfg, tiny_batches):
    quant = dict(FAST_QUANT, weight=dict(type='Uniformm', per_channel=True))
    with pytest.raises(ValueError, match=r"weight\.type='Uniformm' is unknown; allowed: "
                                         r"\[.*'Uniform'"):
        _quantize(tiny_cfg, tiny_batches, quant=quant)


def test_unknown_fields_name_the_allowed_ones(tiny_cfg, tiny_batches):
    with pytest.raises(KeyError, match=r"quant: unknown field\(s\) \['wbits'\]; allowed: "
                                       r"\['w_bits'"):
        _quantize(tiny_cfg, tiny_batches, quant=dict(wbits=4))
    with pytest.raises(KeyError, match=r"calib: unknown field\(s\) \['images'\]; allowed: "
                                       r"\['num_images'"):
        RegPTQHook(calib=dict(images=8))
    with pytest.raises(ValueError, match=r'drop_prob=1\.5 is out of range; allowed 0\.0\.\.1\.0'):
        _quantize(tiny_cfg, tiny_batches, method=dict(type='QDrop', drop_prob=1.5))


def test_model_without_quantizable_layer(tiny_cfg, tiny_batches):
    from mmdet.models.detectors import BaseDetector

    class NormOnly(BaseDetector):
        def __init__(self):
            super().__init__(data_preprocessor=dict(type='DetDataPreprocessor'))
            self.norm = nn.BatchNorm2d(3)

        def _forward(self, inputs, data_samples=None):
            return self.norm(inputs)

        def extract_feat(self, inputs):
            return self.norm(inputs)

        def loss(self, inputs, data_samples):
            return {}

        def predict(self, inputs, data_samples, rescale=True):
            return data_samples

    with pytest.raises(ValueError, match='no Conv2d/Linear/MultiheadAttention to quantize in '
                                         'NormOnly'):
        quantize_detector(NormOnly(), tiny_batches, quant=FAST_QUANT, method=FAST_METHOD)


def _with_ann(cfg, ann: dict, tmp_path):
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps(ann))
    cfg = copy.deepcopy(cfg)
    cfg.train_dataloader.dataset.ann_file = str(path)
    return cfg


def test_empty_calibration_set(tiny_cfg, tmp_path):
    cats = [{'id': i + 1, 'name': n} for i, n in enumerate(tiny_cfg.metainfo['classes'])]
    cfg = _with_ann(tiny_cfg, {'images': [], 'annotations': [], 'categories': cats}, tmp_path)
    with pytest.raises(ValueError, match=r'calib: the calibration dataset is empty '
                                         r'\(train_dataloader\.dataset has no images\)'):
        build_calib_loader(cfg, num_images=2)


def test_missing_calibration_set(tiny_cfg, tmp_path):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match=r'calib: the calibration images '
                                                r'\(train_dataloader\.dataset\) cannot be loaded'):
        build_calib_loader(cfg, num_images=2)
    with pytest.raises(FileNotFoundError, match=r'\(calib\.dataloader\.dataset\)'):
        build_calib_loader(cfg, num_images=2,
                           dataloader=dict(dataset=dict(cfg.train_dataloader.dataset)))


def test_no_train_dataloader(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train_dataloader = None
    with pytest.raises(ValueError, match=r'set calib\.dataloader=dict\(dataset=\.\.\.\)'):
        build_calib_loader(cfg, num_images=2)


@pytest.mark.parametrize('num_images,pattern', [
    (10 ** 6, r'calib\.num_images=1000000 is larger than the calibration dataset '
              r'\(\d+ images\); allowed 1\.\.\d+'),
    (0, r'calib\.num_images=0 must be >= 1'),
])
def test_num_images_out_of_range(tiny_cfg, num_images, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_calib_loader(tiny_cfg, num_images=num_images)


def _nan_batches(batches):
    bad = copy.deepcopy(batches)
    inputs = [img.float() for img in bad[0]['inputs']]
    inputs[0][:, 10:20, 10:20] = float('nan')
    bad[0]['inputs'] = inputs
    return bad


def test_nan_during_calibration_stops_the_unit(tiny_cfg, tiny_batches, tmp_path):
    with pytest.raises(FloatingPointError, match=r"backbone\.conv1"):
        _quantize(tiny_cfg, _nan_batches(tiny_batches), work_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []     # no checkpoint, no partial


def test_nan_never_reaches_a_checkpoint_without_training(tiny_cfg, tiny_batches, tmp_path):
    """MinMax trains nothing (no loss to check): the save refuses the NaN scales."""
    with pytest.raises(FloatingPointError, match=r'has NaN/Inf values; refusing to write'):
        _quantize(tiny_cfg, _nan_batches(tiny_batches), work_dir=tmp_path,
                  method=dict(type='MinMax', progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
