"""`analyze.py compare`: FP vs a quantized checkpoint of the bundled RetinaNet."""
from __future__ import annotations

import copy

import pytest

from analysis_utils import ROOT, assert_png, bundled, read_csv, run_cli
from mmdet_regptq.engine import build_calib_loader, quantize_detector


@pytest.fixture(scope='module')
def quantized_retinanet(retinanet, tmp_path_factory):
    """A W4A4 MinMax quantized.pth (no training: seconds)."""
    cfg, model = retinanet
    work = tmp_path_factory.mktemp('q')
    result = quantize_detector(copy.deepcopy(model), build_calib_loader(cfg, num_images=2),
                               quant=dict(w_bits=4, a_bits=4), method=dict(type='MinMax'),
                               work_dir=work)
    return result['checkpoint']


def test_compare_cli_retinanet(quantized_retinanet, tmp_path):
    config, ckpt = bundled('retinanet')
    images = [str(ROOT / 'data' / 'synthetic' / 'val' / f'00000{i}.jpg') for i in range(3)]
    assert run_cli('compare', config, ckpt, quantized_retinanet, '--images', *images,
                   '--out-dir', str(tmp_path)) == 0
    for i in range(3):
        assert_png(tmp_path / 'images' / f'00000{i}.png')
    assert_png(tmp_path / 'compare_grid.png')
    rows = read_csv(tmp_path / 'compare.csv')
    assert [r['image'] for r in rows] == [f'00000{i}.jpg' for i in range(3)] + ['TOTAL']
    for r in rows:
        n = {k: int(r[k]) for k in ('fp_dets', 'q_dets', 'missed', 'extra', 'shifted',
                                    'relabeled')}
        assert min(n.values()) >= 0
        assert n['missed'] + n['shifted'] <= n['fp_dets'] and n['extra'] <= n['q_dets']
        assert n['relabeled'] <= n['missed']
        assert n['fp_dets'] - n['missed'] == n['q_dets'] - n['extra']  # both: the matches
        if r['mean_iou']:
            assert 0.5 <= float(r['mean_iou']) <= 1.0
    assert int(rows[-1]['fp_dets']) > 0  # the trained detector finds shapes


def test_compare_rejects_a_float_checkpoint(tmp_path):
    config, ckpt = bundled('retinanet')
    with pytest.raises(ValueError, match='not a quantized checkpoint'):
        run_cli('compare', config, ckpt, ckpt, '--num-images', '1', '--out-dir', str(tmp_path))
