"""`analyze.py noise` (Observation 1) on the bundled RetinaNet and Faster R-CNN."""
from __future__ import annotations

import pytest
import torch

from analysis_utils import NUM_IMAGES, assert_png, assert_range, bundled, read_csv, run_cli
from mmdet_regptq.analysis import NoiseConfig, run_noise


def check_rows(rows, parts=('cls', 'reg')) -> None:
    fp = [r for r in rows if r['part'] == 'fp']
    assert len(fp) == 1 and float(fp[0]['det_gl']) == 0.0
    noisy = [r for r in rows if r['part'] != 'fp']
    assert {r['part'] for r in noisy} == set(parts)
    for col in ('out_cls', 'det_cls', 'det_miss', 'mAP', 'mAP_50'):
        assert_range([r[col] for r in rows], 0.0, 1.0, col)
    for col in ('out_box', 'det_box', 'out_gl', 'det_gl'):
        assert_range([r[col] for r in rows], 0.0, 10.0, col)
    assert_range([r['eq_bits'] for r in noisy], 0.0, 32.0, 'eq_bits')
    assert float(fp[0]['mAP']) > 0.2  # the trained detector finds the shapes


def test_noise_cli_retinanet(tmp_path):
    config, ckpt = bundled('retinanet')
    assert run_cli('noise', config, ckpt, '--out-dir', str(tmp_path), '--num-images',
                   str(NUM_IMAGES), '--levels', '0.05', '0.5', '--repeats', '1') == 0
    assert_png(tmp_path / 'noise.png')
    rows = read_csv(tmp_path / 'noise.csv')
    check_rows(rows)
    assert len(rows) == 1 + 2 * 2 * 2
    # regression noise moves boxes and not scores; classification noise the other way round
    reg = [r for r in rows if r['part'] == 'reg']
    cls = [r for r in rows if r['part'] == 'cls']
    assert all(float(r['out_cls']) == 0.0 for r in reg)
    assert all(float(r['out_box']) == 0.0 for r in cls)
    big = {(r['part'], r['noise']): float(r['out_gl']) for r in rows if r['level'] == '0.5'}
    small = {(r['part'], r['noise']): float(r['out_gl']) for r in rows if r['level'] == '0.05'}
    assert all(big[k] > small[k] for k in big)


def test_noise_faster_rcnn_restores_weights(frcnn_bench, tmp_path):
    before = {k: v.clone() for k, v in frcnn_bench.model.state_dict().items()}
    res = run_noise(frcnn_bench, NoiseConfig(levels=(0.5,), kinds=('uniform',), with_ap=True),
                    tmp_path)
    after = frcnn_bench.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res.parts['cls'] == ['rpn_head.rpn_cls', 'roi_head.bbox_head.fc_cls']
    assert res.parts['reg'] == ['rpn_head.rpn_reg', 'roi_head.bbox_head.fc_reg']
    assert_png(tmp_path / 'noise.png')
    rows = read_csv(tmp_path / 'noise.csv')
    check_rows(rows)
    assert_range([r['rpn_box'] for r in rows], 0.0, 10.0, 'rpn_box')  # both stages measured
    assert res.verdict and all('worse' in line for line in res.verdict)


def test_noise_config_names_bad_values():
    with pytest.raises(ValueError, match="'laplace' is unknown"):
        NoiseConfig(kinds=('laplace',))
    with pytest.raises(ValueError, match="'head' is unknown"):
        NoiseConfig(parts=('head',))
