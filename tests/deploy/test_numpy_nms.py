"""The runtime's blocked NumPy NMS keeps exactly what the one-box-at-a-time greedy loop
(mmcv's CPU algorithm) keeps, ties and degenerate boxes included."""
from __future__ import annotations

import numpy as np
import pytest

from mmdet_regptq.deploy.runtime.postprocess import batched_nms, nms

_F32 = np.float32


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_num: int
               ) -> np.ndarray:
    """Reference: mmcv's greedy NMS, one kept box at a time (descending score, stable)."""
    order = np.argsort(-scores, kind='stable')
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) >= max_num > 0:
            break
        rest = order[pos + 1:]
        w = np.maximum(_F32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(_F32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(invalid='ignore', divide='ignore'):
            ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr > iou_threshold]] = True
    return np.asarray(keep, np.int64)


def random_case(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered boxes (many overlaps), a few exact duplicates and zero-area boxes, scores
    rounded to 2 decimals (many ties), some negative coordinates; 5 classes."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-20, 640, (max(1, n // 8), 2))[rng.integers(0, max(1, n // 8), n)]
    xy = centres + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(0, 80, (n, 2)) * (rng.random((n, 1)) > 0.05)   # 5 % zero-size
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(_F32)
    dup = rng.integers(0, n, n // 10)
    boxes[dup[: len(dup) // 2]] = boxes[dup[len(dup) // 2: 2 * (len(dup) // 2)]]
    scores = np.round(rng.random(n), 2).astype(_F32)
    labels = rng.integers(0, 5, n)
    return boxes, scores, labels


@pytest.mark.parametrize('seed,n', [(0, 1), (1, 7), (2, 300), (3, 1000), (4, 2500)])
@pytest.mark.parametrize('iou', [0.0, 0.5, 0.65, 1.0])
@pytest.mark.parametrize('max_num', [1, 50, 300, -1])
def test_same_keep_indices_as_the_greedy_loop(seed, n, iou, max_num):
    boxes, scores, labels = random_case(seed, n)
    want = greedy_nms(boxes, scores, iou, max_num)
    for block in (1, 7, 256, 4096):
        got = nms(boxes, scores, iou, max_num, block=block)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want, err_msg=f'block={block}')
    offsets = labels.astype(_F32) * (boxes.max() + _F32(1))
    np.testing.assert_array_equal(batched_nms(boxes, scores, labels, iou, max_num),
                                  greedy_nms(boxes + offsets[:, None], scores, iou, max_num))


def test_suppresses_and_keeps_ties_in_input_order():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30],
                      [20, 20, 30, 30]], _F32)
    scores = np.array([0.5, 0.9, 0.9, 0.5, 0.5], _F32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.5, 10), [1, 3])
    np.testing.assert_array_equal(nms(boxes, scores, 0.95, 10), [1, 2, 3])
    # other classes are not suppressed
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 1, 2, 0, 0]), 0.5, 10),
                                  [1, 2, 0, 3])


def test_empty_input_and_bad_block():
    assert nms(np.zeros((0, 4), _F32), np.zeros(0, _F32), 0.5, 10).shape == (0,)
    assert batched_nms(np.zeros((0, 4), _F32), np.zeros(0, _F32), np.zeros(0, int), 0.5,
                       10).dtype == np.int64
    with pytest.raises(ValueError, match='block'):
        nms(np.zeros((1, 4), _F32), np.zeros(1, _F32), 0.5, 10, block=0)
