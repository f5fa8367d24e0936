"""The post-processing of a dense detector's (or YOLOv5's) raw outputs in NumPy (for
backends whose graph stops at the raw head outputs, e.g. ``tvm_int4``), and the final
rescale of any backend's detections to the original image.

The steps are those of the end-to-end ONNX graph (``deploy/detectors/end2end.py``), i.e.
mmdet's ``BaseDenseHead`` predict: per level the top ``nms_pre`` (prior, class) scores,
decoding, score threshold, score factor, minimum box size, class-aware greedy NMS (mmcv's
algorithm: descending score, suppress IoU > threshold) and ``max_per_img``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ['nms', 'batched_nms', 'decode', 'DensePostProcessor', 'YOLOv5PostProcessor',
           'make_post_processor', 'rescale_detections']

_F32 = np.float32


#: candidates per block of :func:`nms` (a ``[block, block]`` IoU matrix at a time)
NMS_BLOCK = 256


def _iou(boxes: np.ndarray, areas: np.ndarray, rows: np.ndarray, cols: np.ndarray
         ) -> np.ndarray:
    """IoU ``[len(rows), len(cols)]`` of the boxes at ``rows`` with those at ``cols``, with
    the float32 operations of mmcv's CPU kernel in its order (so the same values)."""
    a, b = boxes[rows][:, None, :], boxes[cols][None]
    w = np.maximum(_F32(0), np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]))
    h = np.maximum(_F32(0), np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]))
    inter = w * h
    with np.errstate(invalid='ignore', divide='ignore'):
        return inter / (areas[rows][:, None] + areas[cols][None] - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_num: int,
        block: int = NMS_BLOCK) -> np.ndarray:
    """Greedy NMS as mmcv's CPU kernel: indices kept, best first, at most ``max_num``.

    Blocked, to avoid a Python step per candidate and an IoU of every kept box with every
    later candidate: in score order, ``block`` candidates at a time are first checked
    against the boxes kept so far (one ``[kept, block]`` IoU), then the survivors against
    each other (one IoU matrix) in a greedy pass over its rows; it stops at ``max_num``
    (``<= 0``: no limit, as mmcv's ``batched_nms``).
    The same decisions as the one-box-at-a-time loop (the same IoU values, compared the
    same way), so the same indices, ties included (stable sort by descending score).
    """
    if block < 1:
        raise ValueError(f'nms block={block}: must be >= 1')
    order = np.argsort(-scores, kind='stable')
    boxes = np.asarray(boxes)[order]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    limit = max_num if max_num > 0 else len(order)
    keep: list[int] = []
    for start in range(0, len(order), block):
        cand = np.arange(start, min(start + block, len(order)))
        if keep:
            cand = cand[~(_iou(boxes, areas, np.asarray(keep), cand) > iou_threshold).any(0)]
        over = _iou(boxes, areas, cand, cand) > iou_threshold
        suppressed = np.zeros(len(cand), bool)
        for j in range(len(cand)):
            if suppressed[j]:
                continue
            keep.append(int(cand[j]))
            if len(keep) >= limit:
                return order[np.asarray(keep, np.int64)]
            suppressed |= over[j]
    return order[np.asarray(keep, np.int64)]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float,
                max_num: int) -> np.ndarray:
    """Class-aware NMS with mmcv's coordinate offset (``idx * (max coordinate + 1)``)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    offsets = idxs.astype(_F32) * (boxes.max() + _F32(1))
    return nms(boxes + offsets[:, None], scores, iou_threshold, max_num)


def size_mask(boxes: np.ndarray, min_size: float | None) -> np.ndarray:
    """Boxes wider and taller than ``min_size`` (mmdet's ``min_bbox_size``; ``None`` or
    negative: every box)."""
    if min_size is None or min_size < 0:
        return np.ones(len(boxes), bool)
    return ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)


def nms_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                   cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Class-aware NMS with ``cfg['nms']['iou_threshold']`` and ``max_per_img`` (100) →
    ``(dets [N, 5], labels [N])``."""
    keep = batched_nms(boxes, scores, labels, float(cfg['nms']['iou_threshold']),
                       int(cfg.get('max_per_img', 100)))
    dets = np.concatenate([boxes[keep], scores[keep, None]], 1).astype(_F32)
    return dets, labels[keep].astype(np.int64)


def _clip(boxes: np.ndarray, max_shape: Sequence[int]) -> np.ndarray:
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, max_shape[1])
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, max_shape[0])
    return boxes


def decode(coder: Mapping[str, Any], priors: np.ndarray, deltas: np.ndarray,
           max_shape: Sequence[int]) -> np.ndarray:
    """``DeltaXYWHBBoxCoder`` / ``DistancePointBBoxCoder`` decoding in float32."""
    if coder['type'] == 'DistancePointBBoxCoder':
        p = priors[:, :2]
        boxes = np.stack([p[:, 0] - deltas[:, 0], p[:, 1] - deltas[:, 1],
                          p[:, 0] + deltas[:, 2], p[:, 1] + deltas[:, 3]], -1)
        return _clip(boxes, max_shape) if coder['clip_border'] else boxes
    if coder['type'] != 'DeltaXYWHBBoxCoder':
        raise ValueError(f"box coder {coder['type']!r}: allowed DeltaXYWHBBoxCoder, "
                         'DistancePointBBoxCoder')
    denorm = deltas * np.asarray(coder['stds'], _F32) + np.asarray(coder['means'], _F32)
    dxy, dwh = denorm[:, :2], denorm[:, 2:]
    pxy = (priors[:, :2] + priors[:, 2:4]) * _F32(0.5)
    pwh = priors[:, 2:4] - priors[:, :2]
    dxy_wh = pwh * dxy
    max_ratio = _F32(abs(math.log(coder['wh_ratio_clip'])))
    if coder['add_ctr_clamp']:
        ctr = _F32(coder['ctr_clamp'])
        dxy_wh = np.clip(dxy_wh, -ctr, ctr)
        dwh = np.minimum(dwh, max_ratio)
    else:
        dwh = np.clip(dwh, -max_ratio, max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * np.exp(dwh)
    boxes = np.concatenate([gxy - gwh * _F32(0.5), gxy + gwh * _F32(0.5)], -1)
    return _clip(boxes, max_shape) if coder['clip_border'] else boxes


#: :func:`_top_k` prefilters arrays of at least this many times ``k`` values
TOPK_PREFILTER = 64


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, largest first (a partition, then a sort of the
    ``k``: a full argsort of a 512x512 RetinaNet's first level took 60 ms).

    On a long array (>= ``TOPK_PREFILTER * k``, e.g. RetinaNet's 885k first-level logits
    for ``k = 1000``) the partition itself took ~7 ms; a threshold from every ``step``-th
    value (a ``16 k`` sample) first keeps the values at or above it, a few thousand, and
    the partition runs on those. Exact: with at least ``k`` values kept, every one of the
    ``k`` largest is among them (else the full partition runs)."""
    if not 0 < k < values.size:
        idx = np.arange(values.size)
    else:
        idx = None
        if values.size >= TOPK_PREFILTER * k:
            step = values.size // (16 * k)
            sample = values[::step]
            rank = min(sample.size, 4 * (k // step) + 64)     # ~4x k values above it
            threshold = np.partition(sample, sample.size - rank)[sample.size - rank]
            kept = np.flatnonzero(values >= threshold)
            if kept.size >= k:
                idx = kept[np.argpartition(-values[kept], k - 1)[:k]]
        if idx is None:
            idx = np.argpartition(-values, k - 1)[:k]
    return idx[np.argsort(-values[idx], kind='stable')]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (_F32(1) / (_F32(1) + np.exp(-x))).astype(_F32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(_F32)


class DensePostProcessor:
    """Raw outputs ``raw{i}_{j}`` of a dense head → ``(dets [N, 5], labels [N])``.

    Args:
        spec: ``spec['postprocess']`` (written by ``detectors/spec.py``).
        priors: per level ``[P, 4]`` anchors or ``[P, 2]`` points.
    """

    def __init__(self, spec: Mapping[str, Any], priors: Sequence[np.ndarray]) -> None:
        self.spec = spec
        self.cfg = spec['test_cfg']
        self.priors = [np.asarray(p, _F32) for p in priors]

    def level(self, i: int, raw: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """``(boxes, scores, labels, passed threshold)`` of level ``i``'s top ``nms_pre``.

        With sigmoid scores the top-k runs on the logits in their stored ``[A * C, H, W]``
        layout (sigmoid is monotonic; no transpose of the whole map), and the indices are
        mapped to mmdet's (position, anchor, class) order.
        """
        s = self.spec
        logits = raw[f'raw0_{i}'][0]
        classes = s['cls_out_channels']
        anchors = logits.shape[0] // classes
        hw = logits.shape[1] * logits.shape[2]
        nms_pre = int(self.cfg.get('nms_pre', -1))
        k = logits.size if nms_pre <= 0 else min(nms_pre, logits.size)
        if s['use_sigmoid']:
            flat = logits.reshape(-1)
            stored = _top_k(flat, k)
            top = _sigmoid(flat[stored])
            channel, pos = np.divmod(stored, hw)
            anchor, labels = np.divmod(channel, classes)
        else:
            scores = _softmax(logits.reshape(anchors, classes, hw).transpose(2, 0, 1)
                              .reshape(-1, classes))[:, :-1]
            flat = scores.reshape(-1)
            idx = _top_k(flat, k)
            top = flat[idx]
            prior, labels = np.divmod(idx, classes - 1)
            pos, anchor = np.divmod(prior, anchors)
        size = s['encode_size']
        deltas = raw[f'raw1_{i}'][0].reshape(anchors, size, hw)[anchor, :, pos]
        boxes = decode(s['coder'], self.priors[i][pos * anchors + anchor], deltas,
                       s['input_shape'])
        passed = top > _F32(self.cfg.get('score_thr', 0.0))
        if s['score_factors']:
            factor = raw[f'raw2_{i}'][0].reshape(-1, hw)[anchor, pos]
            top = top * _sigmoid(factor)
        return boxes, top, labels, passed

    def __call__(self, raw: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        parts = [self.level(i, raw) for i in range(len(self.priors))]
        boxes, scores, labels, valid = (np.concatenate(t) for t in zip(*parts))
        valid &= size_mask(boxes, self.cfg.get('min_bbox_size', -1))
        return nms_detections(boxes[valid], scores[valid], labels[valid], self.cfg)


class YOLOv5PostProcessor:
    """Raw maps ``raw0_{i}`` ``[1, A * (5 + C), H, W]`` of a ``YOLOv5Head`` →
    ``(dets [N, 5], labels [N])``: the steps of ``YOLOv5End2End`` (the end-to-end graph,
    i.e. ``YOLOv5Head.predict_by_feat`` without rescale) in NumPy.

    Sigmoid of the maps, score ``objectness × class``, every (box, class) pair above
    ``score_thr`` (multi-label) or the best class of each box, the ``nms_pre`` best, the
    head's decoding ``xy = (2σ − 0.5 + grid)·s`` (as the prior centre plus
    ``(2σ − 1)·s``), ``wh = (2σ)²·anchor``, class-aware NMS and ``max_per_img``.

    Args:
        spec: ``spec['postprocess']`` (``kind='yolov5'``, written by ``detectors/spec.py``).
        priors: per level ``[H * W * A, 4]`` anchor boxes centred on the grid cells.
    """

    def __init__(self, spec: Mapping[str, Any], priors: Sequence[np.ndarray]) -> None:
        self.spec = spec
        self.cfg = spec['test_cfg']
        self.num_attrib = int(spec['num_classes']) + 5
        self.priors = np.concatenate([np.asarray(p, _F32) for p in priors])
        self.strides = np.concatenate([np.full(len(p), s, _F32)
                                       for p, s in zip(priors, spec['strides'])])[:, None]
        centre = (self.priors[:, :2] + self.priors[:, 2:]) * _F32(0.5)
        self.centre, self.size = centre, self.priors[:, 2:] - self.priors[:, :2]

    def _rows(self, maps: Sequence[np.ndarray], box_idx: np.ndarray) -> np.ndarray:
        """Rows ``[len(box_idx), 5 + C]`` of the boxes ``box_idx`` (sorted, numbered over the
        levels' ``[H * W, A]`` grids) from the ``[A, 5 + C, H * W]`` maps."""
        parts, start = [], 0
        for m in maps:
            size = m.shape[0] * m.shape[2]
            lo, hi = np.searchsorted(box_idx, [start, start + size])
            pos, anchor = np.divmod(box_idx[lo:hi] - start, m.shape[0])
            parts.append(m[anchor, :, pos])
            start += size
        return np.concatenate(parts).astype(_F32)

    def __call__(self, raw: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        # per level [A, 5 + C, H * W] views; boxes are numbered (level, position, anchor)
        maps = [m.reshape(-1, self.num_attrib, m.shape[1] * m.shape[2])
                for m in (raw[f'raw0_{i}'][0] for i in range(len(self.spec['strides'])))]
        thr = _F32(self.cfg['score_thr'])
        # objectness bounds every score (objectness x class, class <= 1): only boxes above
        # the threshold can have a pair above it, as in the graph (the rest is not decoded
        # and not even transposed: only their rows are gathered from the maps)
        objectness = np.concatenate([m[:, 4].T.reshape(-1) for m in maps])
        box_idx = np.nonzero(_sigmoid(objectness) > thr)[0]
        preds = _sigmoid(self._rows(maps, box_idx))
        scores = preds[:, 4:5] * preds[:, 5:]
        nms_pre = int(self.cfg['nms_pre'])
        if self.cfg.get('multi_label', True):
            local, labels = np.nonzero(scores > thr)     # (box, class) pairs, row-major
            top = scores[local, labels]
        else:
            best, best_labels = scores.max(1), scores.argmax(1)
            local = np.nonzero(best > thr)[0]
            top, labels = best[local], best_labels[local]
        order = _top_k(top, min(nms_pre, top.size))
        local, top, labels = local[order], top[order], labels[order]
        idx = box_idx[local]
        p = preds[local, :4]
        xy = self.centre[idx] + (p[:, :2] * _F32(2) - _F32(1)) * self.strides[idx]
        wh = (p[:, 2:4] * _F32(2)) ** 2 * self.size[idx]
        boxes = np.concatenate([xy - wh * _F32(0.5), xy + wh * _F32(0.5)], 1)
        keep = batched_nms(boxes, top, labels, float(self.cfg['nms']['iou_threshold']),
                           int(self.cfg.get('max_per_img', 300)))
        dets = np.concatenate([boxes[keep], top[keep, None]], 1).astype(_F32)
        return dets, labels[keep].astype(np.int64)


#: ``spec['postprocess']['kind']`` -> its post-processor
POST_PROCESSORS = {'dense': DensePostProcessor, 'yolov5': YOLOv5PostProcessor}


def make_post_processor(spec: Mapping[str, Any], priors: Sequence[np.ndarray]) -> Any:
    """The post-processor of ``spec['postprocess']`` (its ``kind``) with its priors."""
    kind = spec.get('kind', 'dense')
    if kind not in POST_PROCESSORS:
        raise ValueError(f"spec.json postprocess.kind {kind!r}; allowed: "
                         f"{', '.join(POST_PROCESSORS)}")
    return POST_PROCESSORS[kind](spec, priors)


def rescale_detections(dets: np.ndarray, scale_factor: Sequence[float],
                       pad: Sequence[int] | None = None,
                       clip_shape: Sequence[int] | None = None) -> np.ndarray:
    """Boxes from the network input back to the original image (mmdet ``rescale=True``).

    Without ``pad``: times ``1 / scale`` per axis (``scale_factor = (w scale, h scale)``),
    as ``BaseDenseHead`` rescales. With ``pad`` ``(top, left)`` (a letterbox): minus the
    padding, divided by the scale, clipped to ``clip_shape`` ``(h, w)`` of the original
    image, as ``YOLOv5Head`` undoes ``YOLOv5Letterbox``.
    """
    out = dets.astype(_F32).copy()
    if pad is None:
        out[:, 0:4:2] *= _F32(1 / scale_factor[0])
        out[:, 1:4:2] *= _F32(1 / scale_factor[1])
        return out
    top, left = pad
    out[:, 0:4:2] = (out[:, 0:4:2] - _F32(left)) / _F32(scale_factor[0])
    out[:, 1:4:2] = (out[:, 1:4:2] - _F32(top)) / _F32(scale_factor[1])
    if clip_shape is not None:
        out[:, 0:4:2] = np.clip(out[:, 0:4:2], 0, clip_shape[1])
        out[:, 1:4:2] = np.clip(out[:, 1:4:2], 0, clip_shape[0])
    return out
