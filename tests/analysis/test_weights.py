"""`analyze.py weights` (Observation 3) on the bundled detectors."""
from __future__ import annotations

import pytest

from analysis_utils import assert_png, assert_range, bundled, read_csv, run_cli
from mmdet_regptq.analysis import WeightsConfig, run_weights


def test_weights_cli_retinanet(tmp_path):
    config, ckpt = bundled('retinanet')
    assert run_cli('weights', config, ckpt, '--out-dir', str(tmp_path), '--bits', '4') == 0
    assert_png(tmp_path / 'weights.png')
    rows = read_csv(tmp_path / 'weights.csv')
    assert [r['layer'] for r in rows] == [
        'bbox_head.cls_convs.0.conv', 'bbox_head.cls_convs.1.conv', 'bbox_head.retina_cls',
        'bbox_head.reg_convs.0.conv', 'bbox_head.reg_convs.1.conv', 'bbox_head.retina_reg']
    for col in ('clip_uniform', 'clip_llaq'):
        assert_range([r[col] for r in rows], 0.0, 1.0, col)
    assert_range([r['err_uniform'] for r in rows], 0.0, 1.0, 'err_uniform')
    assert_range([r['err_llaq'] for r in rows], 0.0, 2.0, 'err_llaq')
    assert_range([r['kurtosis'] for r in rows], -2.0, 1000.0, 'kurtosis')
    assert_range([r['std'] for r in rows], 1e-6, 10.0, 'std')


def test_weights_faster_rcnn_linear_layers(faster_rcnn, tmp_path):
    _, model = faster_rcnn
    res = run_weights(model, WeightsConfig(bits=3, parts=('cls', 'reg', 'shared')), tmp_path)
    parts = {r['layer']: r['part'] for r in res.table.rows}
    assert parts['roi_head.bbox_head.fc_reg'] == 'reg'
    assert parts['roi_head.bbox_head.shared_fcs.0'] == 'shared'
    assert_range(res.table.column('clip_uniform'), 0.0, 1.0, 'clip_uniform')
    assert_png(tmp_path / 'weights.png')


def test_weights_config_rejects_bits():
    with pytest.raises(ValueError, match='bits=9'):
        WeightsConfig(bits=9)
