"""Calibration images: the train set through the TEST pipeline, also when the train set is
wrapped (PASCAL VOC's RepeatDataset(ConcatDataset([VOC07, VOC12])), YOLOX's mosaic)."""
from __future__ import annotations

import copy

import pytest

from engine_utils import SIZE
from mmdet_regptq.engine import build_calib_loader


def _leaf(cfg):
    return copy.deepcopy(cfg.train_dataloader.dataset)


@pytest.mark.parametrize('wrap', ['voc', 'mosaic'])
def test_wrapped_train_sets_get_the_test_pipeline(tiny_cfg, wrap):
    cfg = copy.deepcopy(tiny_cfg)
    if wrap == 'voc':
        cfg.train_dataloader.dataset = dict(
            type='RepeatDataset', times=3, dataset=dict(
                type='ConcatDataset', datasets=[_leaf(tiny_cfg), _leaf(tiny_cfg)]))
    else:
        cfg.train_dataloader.dataset = dict(
            type='MultiImageMixDataset', dataset=_leaf(tiny_cfg),
            pipeline=[dict(type='Mosaic', img_scale=(SIZE, SIZE)), dict(type='PackDetInputs')])
    loader = build_calib_loader(cfg, num_images=2, batch_size=2)
    (batch,) = list(loader)
    for sample in batch['data_samples']:
        assert 'flip' not in sample.metainfo                 # no RandomFlip: test pipeline
        assert max(sample.img_shape) == SIZE
