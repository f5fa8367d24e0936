"""Reg-PTQ on a head the adapter cannot decode: raw-output MSE, with a warning."""
from __future__ import annotations

import logging

import pytest
import torch
from engine_utils import FAST_QUANT, build_detector, predict

from mmdet_regptq.calib import output_mse
from mmdet_regptq.calib.fgic import FGICLoss
from mmdet_regptq.engine.ptq import build_global_loss, prepare_batches, quantize_detector
from mmdet_regptq.models.adapters import DenseHeadAdapter, find_adapter


def test_decodable_head_gets_fgic(tiny_cfg, tiny_batches):
    model = build_detector(tiny_cfg)
    adapter = find_adapter(model)
    batch = prepare_batches(adapter, tiny_batches)[0]
    loss = build_global_loss(adapter, None, batch, logging.getLogger('t'))
    assert isinstance(loss, FGICLoss)


def test_undecodable_head_falls_back_and_calibrates(tiny_cfg, tiny_batches, monkeypatch,
                                                      caplog):
    def no_priors(self, raw):  # what a keypoint head (CornerNet's) raises
        raise AttributeError("'CornerHead' object has no attribute 'prior_generator'")

    monkeypatch.setattr(DenseHeadAdapter, 'decode_stages', no_priors)
    model = build_detector(tiny_cfg)
    adapter = find_adapter(model)
    batch = prepare_batches(adapter, tiny_batches)[0]
    with caplog.at_level(logging.WARNING):
        loss = build_global_loss(adapter, None, batch, logging.getLogger('fallback'))
    assert loss is output_mse
    assert 'prior_generator' in caplog.text and 'RetinaHead' in caplog.text
    method = dict(type='RegPTQ', iters=2, progress=False, log_interval=0)
    result = quantize_detector(model, tiny_batches, quant=FAST_QUANT, method=method)
    assert result['stats'] and all(torch.isfinite(torch.tensor(s.loss_after))
                                   for s in result['stats'])
    assert predict(model, tiny_batches[0])


def test_a_box_coder_shape_assertion_falls_back(tiny_cfg, tiny_batches, monkeypatch, caplog):
    def unknown_layout(self, raw):  # mmdet's DeltaXYWHBBoxCoder: a bare `assert` on shapes
        raise AssertionError()

    monkeypatch.setattr(DenseHeadAdapter, 'decode_stages', unknown_layout)
    adapter = find_adapter(build_detector(tiny_cfg))
    batch = prepare_batches(adapter, tiny_batches)[0]
    with caplog.at_level(logging.WARNING):
        assert build_global_loss(adapter, None, batch, logging.getLogger('t')) is output_mse
    assert 'AssertionError' in caplog.text


def test_other_errors_are_not_swallowed(tiny_cfg, tiny_batches, monkeypatch):
    def broken(self, raw):
        raise RuntimeError('a real bug')

    monkeypatch.setattr(DenseHeadAdapter, 'decode_stages', broken)
    model = build_detector(tiny_cfg)
    adapter = find_adapter(model)
    batch = prepare_batches(adapter, tiny_batches)[0]
    with pytest.raises(RuntimeError, match='a real bug'):
        build_global_loss(adapter, None, batch, logging.getLogger('t'))
