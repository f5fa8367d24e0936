"""`analyze.py scales` (Observation 2) on the bundled detectors."""
from __future__ import annotations

import pytest
import torch

from analysis_utils import NUM_IMAGES, assert_png, assert_range, bundled, read_csv, run_cli
from mmdet_regptq.analysis import ScalesConfig, run_scales


def test_scales_cli_retinanet(tmp_path):
    config, ckpt = bundled('retinanet')
    assert run_cli('scales', config, ckpt, '--layer', 'bbox_head.reg_convs.0.conv',
                   '--out-dir', str(tmp_path), '--num-images', str(NUM_IMAGES),
                   '--factors', '0.5', '0.8', '1.0', '1.3') == 0
    assert_png(tmp_path / 'scales.png')
    rows = read_csv(tmp_path / 'scales.csv')
    assert [float(r['factor']) for r in rows] == [0.5, 0.8, 1.0, 1.3]
    assert_range([r['local_mse'] for r in rows], 1e-12, 1e3, 'local_mse')
    assert_range([r['mAP'] for r in rows], 0.0, 1.0, 'mAP')
    assert_range([r['out_gl'] for r in rows], 1e-9, 10.0, 'out_gl')
    # the min-error scale is (near) the best weight MSE; halving the scale clips a lot
    mse = {float(r['factor']): float(r['weight_mse']) for r in rows}
    assert mse[1.0] < mse[0.5]


def test_scales_faster_rcnn_linear_and_restore(frcnn_bench, tmp_path):
    layer = 'roi_head.bbox_head.fc_reg'
    module = dict(frcnn_bench.model.named_modules())[layer]
    before = module.weight.detach().clone()
    res = run_scales(frcnn_bench, ScalesConfig(layer=layer, factors=(0.7, 1.0)), tmp_path)
    assert torch.equal(module.weight, before)
    assert set(res.best) >= {'local_mse', 'out_gl'}
    assert_png(tmp_path / 'scales.png')


def test_scales_unknown_layer_lists_head_layers(retina_bench):
    with pytest.raises(ValueError, match='bbox_head.reg_convs.0.conv'):
        run_scales(retina_bench, ScalesConfig(layer='bbox_head.nope'))
