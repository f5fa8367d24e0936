"""A quantized checkpoint's meta loads with ``weights_only=True`` whatever the config nests."""
from __future__ import annotations

import torch
from mmengine.config import ConfigDict

from mmdet_regptq.engine.ptq import _describe, _method_options


def test_nested_config_dicts_are_saved_as_plain_data(tmp_path):
    quant = ConfigDict(w_bits=4, a_bits=8, weight=ConfigDict(symmetric=False),
                       overrides={r'backbone\.stem': dict(w_bits=8)}, fp_layers=('head',))
    method = ConfigDict(type='RegPTQ', schedule=ConfigDict(global_interval=8))
    meta = {**_describe(quant, method), **_method_options(method)}
    path = tmp_path / 'meta.pth'
    torch.save({'meta': meta}, path)
    loaded = torch.load(path, weights_only=True)['meta']
    assert loaded == meta
    assert loaded['quant']['weight'] == {'symmetric': False}
    assert loaded['quant']['fp_layers'] == ['head']
    assert _describe(quant, method) == {'quant': loaded['quant'], 'method': 'RegPTQ'}
