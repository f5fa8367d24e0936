"""Quantized checkpoints: packed integer weights, identical predictions after a round
trip, and clear errors for a mismatching model or a corrupt file."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from engine_utils import (FAST_METHOD, FAST_QUANT, REPO, build_detector, predict, small_cfg)
from mmdet_regptq.engine.checkpoint import (load_quantized, pack_model, read_quantized,
                                            save_quantized)
from mmdet_regptq.engine.ptq import quantize_detector
from mmdet_regptq.quant import unpack_int


@pytest.fixture(scope='module')
def saved(tiny_cfg, tiny_batches, tmp_path_factory):
    """A calibrated tiny RetinaNet, its predictions and its quantized.pth."""
    work_dir = tmp_path_factory.mktemp('ckpt')
    model = build_detector(tiny_cfg)
    result = quantize_detector(model, tiny_batches, quant=FAST_QUANT, method=FAST_METHOD,
                               work_dir=work_dir, logger=logging.getLogger('test.ckpt'))
    return dict(model=model, path=result['checkpoint'], preds=predict(model, tiny_batches[0]),
                report=result['report'])


def _load_into(cfg, batches, path, quant=FAST_QUANT, method=FAST_METHOD, seed=1):
    model = build_detector(cfg, seed=seed)   # other random init: everything must come from the file
    quantize_detector(model, batches, quant=quant, method=method, quantized_checkpoint=path)
    return model


def test_round_trip_gives_identical_predictions(saved, tiny_cfg, tiny_batches):
    model = _load_into(tiny_cfg, tiny_batches, saved['path'])
    for (b0, s0, l0), (b1, s1, l1) in zip(saved['preds'], predict(model, tiny_batches[0])):
        assert torch.equal(b0, b1) and torch.equal(s0, s1) and torch.equal(l0, l1)
    assert len(saved['preds'][0][0]) > 0


def test_weights_are_packed_integers(saved):
    ckpt = read_quantized(saved['path'])
    assert ckpt['meta']['format_version'] == 2
    packed = ckpt['packed']
    assert len(packed) == saved['report'].num_quantized
    for key, entry in packed.items():
        assert key not in ckpt['state_dict']                       # no float copy kept
        assert entry['codes'].dtype == torch.int32
        assert entry['codes'].numel() == -(-torch.Size(entry['shape']).numel()
                                           // (32 // entry['bits']))
        codes = unpack_int(entry['codes'], entry['bits'], entry['shape'],
                           signed=entry['signed'])
        assert 0 <= int(codes.min()) and int(codes.max()) < 2 ** entry['bits']
    storage = ckpt['meta']['storage']
    assert storage['num_unpacked'] == 0
    # 4-bit weights (8-bit first layer): about 8x smaller than float32, scales included
    assert storage['packed_bytes'] * 6 < storage['fp32_weight_bytes']


def test_size_is_logged(saved, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger='test.size'):
        path = save_quantized(saved['model'], tmp_path / 'q.pth', {'method': 'QDrop'},
                              logger=logging.getLogger('test.size'))
    line = next(r.getMessage() for r in caplog.records if 'quantized checkpoint' in r.getMessage())
    assert f'{path.stat().st_size / 2**20:.2f} MiB on disk' in line
    assert 'weight tensors packed into' in line and 'x smaller' in line


def test_other_bits_name_first_mismatching_layer(saved, tiny_cfg, tiny_batches):
    quant = dict(FAST_QUANT, w_bits=2)
    first = next(r.name for r in saved['report'].layers if r.w_bits not in (None, 8))
    with pytest.raises(ValueError, match=rf"layer '{re.escape(first)}' has 4-bit weights"):
        _load_into(tiny_cfg, tiny_batches, saved['path'], quant=quant)


def test_other_config_names_first_mismatching_layer(saved, tiny_batches):
    cfg = small_cfg(REPO / 'configs' / 'synthetic' / 'fcos_r18-16_fpn64_synthetic.py')
    with pytest.raises(ValueError, match=r"layer 'neck\.fpn_convs\.4\.conv'"):
        _load_into(cfg, tiny_batches, saved['path'])


def test_other_method_is_refused(saved, tiny_cfg, tiny_batches):
    method = dict(type='AdaRound', iters=2, progress=False)
    with pytest.raises(ValueError, match=r"method='QDrop'.*method='AdaRound'.*first quantized "
                                         r"layer: 'backbone\.conv1'"):
        _load_into(tiny_cfg, tiny_batches, saved['path'], method=method)


def test_full_float_format_still_loads(saved, tiny_cfg, tiny_batches, tmp_path):
    path = save_quantized(saved['model'], tmp_path / 'v1.pth', {}, pack=False)
    assert read_quantized(path)['meta']['format_version'] == 1
    model = build_detector(tiny_cfg, seed=1)
    quantize_detector(model, tiny_batches, quant=FAST_QUANT, method=FAST_METHOD)
    load_quantized(model, path)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(saved['preds'],
                                                        predict(model, tiny_batches[0])))


@pytest.mark.parametrize('content,error,pattern', [
    (None, FileNotFoundError, 'does not exist'),
    (b'not a checkpoint', ValueError, 'cannot be read'),
    ('truncated', ValueError, 'cannot be read'),
    ({'weights': torch.zeros(2)}, ValueError, "expected keys 'state_dict' and 'meta'"),
    ({'state_dict': {}, 'meta': {'format_version': 7}}, ValueError,
     r'format_version=7; allowed: \[1, 2\]'),
])
def test_corrupt_checkpoint(saved, tmp_path, content, error, pattern):
    path = tmp_path / 'bad.pth'
    if content == 'truncated':
        data = open(saved['path'], 'rb').read()
        path.write_bytes(data[:len(data) // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=pattern):
        load_quantized(saved['model'], path)
    assert 'quantized_checkpoint=' in str(pytest.raises(error, read_quantized, path).value)


def test_pack_model_keeps_unpackable_weights_float(saved):
    model = saved['model']
    name, wrapper = next((n, m) for n, m in model.named_modules() if hasattr(m, 'quant_weight'))
    wrapper.quant_weight = False                 # FP weights: must not be packed
    try:
        float_state, packed, storage = pack_model(model)
    finally:
        wrapper.quant_weight = True
    assert f'{name}.module.weight' in float_state and f'{name}.module.weight' not in packed
    assert storage['num_unpacked'] == 1


def test_regptq_with_learned_llaq_rounding_round_trips(tiny_cfg, tiny_batches, tmp_path):
    """LLAQRound layers are stored unpacked with their hard rounding; a fresh model that
    loads the file predicts the same boxes."""
    method = dict(type='RegPTQ', iters=2, progress=False, log_interval=0,
                  experimental=dict(llaq_rounding='learned'))
    model = build_detector(tiny_cfg)
    result = quantize_detector(model, tiny_batches, quant=FAST_QUANT, method=method,
                               work_dir=tmp_path, logger=logging.getLogger('test.ckpt'))
    from mmdet_regptq.quant import LLAQRoundQuantizer, iter_quant_modules
    rounded = [n for n, m in iter_quant_modules(model)
               if isinstance(m.weight_quantizer, LLAQRoundQuantizer)]
    assert rounded and all(dict(iter_quant_modules(model))[n].weight_quantizer.hardened
                           for n in rounded)
    loaded = _load_into(tiny_cfg, tiny_batches, result['checkpoint'], method=method)
    for (b0, s0, _), (b1, s1, _) in zip(predict(model, tiny_batches[0]),
                                        predict(loaded, tiny_batches[0])):
        assert torch.equal(b0, b1) and torch.equal(s0, s1)
