"""The FP-vs-modified measures on hand-made detections (no model)."""
from __future__ import annotations

import math

import pytest
import torch

from mmdet_regptq.analysis import ProxyConfig, Table, detection_errors, match_detections
from mmdet_regptq.analysis.bench import Detections


def dets(boxes, scores, labels) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float), torch.tensor(scores),
                      torch.tensor(labels), 0, 'x.jpg', (100, 200))


REF = dets([[0, 0, 50, 50], [100, 0, 150, 50], [0, 50, 40, 90]], [0.9, 0.8, 0.6], [0, 1, 2])


def test_identical_detections_have_no_error():
    diff = match_detections(REF, REF, ProxyConfig())
    assert (diff.num_ref, diff.missed, diff.extra, diff.shifted, diff.relabeled) == (3, 0, 0, 0, 0)
    assert detection_errors([REF], [REF], ProxyConfig()) == {
        'det_cls': 0.0, 'det_box': 0.0, 'det_miss': 0.0, 'det_gl': 0.0}


def test_missed_extra_shifted_relabeled_are_counted():
    cur = dets([[0, 0, 50, 60],          # class 0, IoU 0.83 -> matched, shifted at 0.9
                [100, 0, 150, 50],       # class 2 on the class-1 box -> relabeled + extra
                [150, 50, 190, 90]],     # nothing there in FP -> extra
               [0.7, 0.8, 0.5], [0, 2, 1])
    diff = match_detections(REF, cur, ProxyConfig(shift_iou=0.9))
    assert (diff.missed, diff.extra, diff.shifted, diff.relabeled) == (2, 2, 1, 1)
    assert diff.matched.tolist() == [True, False, False]
    assert diff.score_err.tolist() == pytest.approx([0.2, 0.8, 0.6])
    # 10 px on y2 of a 100 px high image, averaged over 4 coordinates
    assert diff.box_err[0].item() == pytest.approx(0.1 / 4)
    err = detection_errors([REF], [cur], ProxyConfig())
    assert err['det_miss'] == pytest.approx(2 / 3)
    assert err['det_cls'] == pytest.approx((0.2 + 0.8 + 0.6) / 3)


def test_no_fp_detection_gives_nan_not_an_error():
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0,
                       'x.jpg', (100, 200))
    err = detection_errors([empty], [REF], ProxyConfig())
    assert math.isnan(err['det_cls']) and math.isnan(err['det_miss'])


def test_proxy_config_names_the_bad_field():
    with pytest.raises(ValueError, match='score_thr=1.5'):
        ProxyConfig(score_thr=1.5)


def test_table_csv_round_trip(tmp_path):
    table = Table(['a', 'b'])
    table.add(a='x', b=0.5)
    table.add(a='y')
    with pytest.raises(KeyError, match="'c'"):
        table.add(c=1)
    assert table.to_csv(tmp_path / 't.csv').read_text().splitlines() == ['a,b', 'x,0.5', 'y,']
    assert '-' in table.format().splitlines()[-1]


def test_displayed_matching_ignores_boxes_below_the_threshold():
    low = dets([[0, 0, 50, 50]], [0.2], [0])  # still there, but not drawn at 0.3
    assert match_detections(REF, low, ProxyConfig()).missed == 2
    diff = match_detections(REF, low, ProxyConfig(), displayed=True)
    assert (diff.num_ref, diff.missed, diff.num_cur, diff.extra) == (3, 3, 0, 0)
