"""mmcv's ``RoIAlign`` (average pooling) and mmdet's ``SingleRoIExtractor`` in NumPy, for
the torch-free two-stage runtime (``runtime/two_stage.py``).

mmcv's CPU kernel samples ``grid_h x grid_w`` points per output bin (``sampling_ratio``, or
``ceil(roi size / output size)`` per RoI when it is 0), each a bilinear interpolation of the
feature map (points outside ``[-1, size]`` count as zero, coordinates below 0 are clamped
to 0, the last row / column is repeated), and averages them. The bilinear weights of a
point are a product of a row weight and a column weight, so per RoI the pooled map is
``Wy @ feature @ Wx.T`` with ``Wy [out_h, H]`` / ``Wx [out_w, W]`` the summed sample weights
of each bin, computed on the window of rows / columns the RoI touches: the kernel's values
up to float32 summation order.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ['roi_align', 'map_roi_levels', 'extract_roi_features']

_F32 = np.float32


def _axis_weights(start: np.float32, bin_size: np.float32, grid: int, pooled: int,
                  size: int) -> tuple[int, np.ndarray]:
    """``(first index, [pooled, window] weights)`` of one axis of one RoI (module doc)."""
    if grid <= 0:
        return 0, np.zeros((pooled, 0), _F32)
    step = np.arange(grid, dtype=_F32) + _F32(0.5)
    pos = (start + np.arange(pooled, dtype=_F32)[:, None] * bin_size
           + step[None] * bin_size / _F32(grid)).astype(_F32)         # [pooled, grid]
    valid = (pos >= -1) & (pos <= size)
    pos = np.maximum(pos, _F32(0))
    low = pos.astype(np.int64)
    last = low >= size - 1
    low = np.where(last, size - 1, low)
    high = np.where(last, size - 1, low + 1)
    pos = np.where(last, low.astype(_F32), pos)
    frac = (pos - low).astype(_F32)
    w_high = np.where(valid, frac, _F32(0))
    w_low = np.where(valid, _F32(1) - frac, _F32(0))
    first = int(low[valid].min()) if valid.any() else 0
    window = int(high[valid].max()) + 1 - first if valid.any() else 0
    weights = np.zeros((pooled, max(window, 0)), _F32)
    rows = np.broadcast_to(np.arange(pooled)[:, None], pos.shape)
    if window > 0:
        np.add.at(weights, (rows[valid], low[valid] - first), w_low[valid])
        np.add.at(weights, (rows[valid], high[valid] - first), w_high[valid])
    return first, weights


def roi_align(feat: np.ndarray, boxes: np.ndarray, output_size: Sequence[int],
              spatial_scale: float, sampling_ratio: int, aligned: bool) -> np.ndarray:
    """mmcv ``roi_align(..., pool_mode='avg')`` of one image.

    Args:
        feat: ``[C, H, W]`` feature map.
        boxes: ``[K, 4]`` RoIs (x1, y1, x2, y2) in input pixels.
        output_size: ``(out_h, out_w)``.
        spatial_scale: feature pixels per input pixel (``1 / stride``).
        sampling_ratio: sample points per bin and axis; 0 = ``ceil(roi size / out size)``.
        aligned: mmcv's ``aligned`` (shift the RoI by half a pixel, no minimum size).

    Returns:
        ``[K, C, out_h, out_w]`` float32.
    """
    out_h, out_w = (int(v) for v in output_size)
    channels, height, width = feat.shape
    feat = np.asarray(feat, _F32)
    out = np.zeros((len(boxes), channels, out_h, out_w), _F32)
    offset = _F32(0.5) if aligned else _F32(0)
    scaled = np.asarray(boxes, _F32) * _F32(spatial_scale) - offset
    for k, (x1, y1, x2, y2) in enumerate(scaled):
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, _F32(1)), max(roi_h, _F32(1))
        bin_h, bin_w = _F32(roi_h / _F32(out_h)), _F32(roi_w / _F32(out_w))
        grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_h / _F32(out_h)))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_w / _F32(out_w)))
        count = _F32(max(grid_h * grid_w, 1))
        y0, wy = _axis_weights(y1, bin_h, grid_h, out_h, height)
        x0, wx = _axis_weights(x1, bin_w, grid_w, out_w, width)
        if wy.shape[1] == 0 or wx.shape[1] == 0:
            continue
        window = feat[:, y0:y0 + wy.shape[1], x0:x0 + wx.shape[1]]
        out[k] = (wy @ window @ wx.T) / count
    return out


def map_roi_levels(boxes: np.ndarray, num_levels: int, finest_scale: float) -> np.ndarray:
    """mmdet ``SingleRoIExtractor.map_roi_levels``: ``floor(log2(sqrt(area) / finest_scale
    + 1e-6))`` clamped to ``[0, num_levels - 1]``."""
    boxes = np.asarray(boxes, _F32)
    scale = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = np.floor(np.log2(scale / _F32(finest_scale) + _F32(1e-6)))
    return np.clip(level, 0, num_levels - 1).astype(np.int64)


def extract_roi_features(feats: Sequence[np.ndarray], boxes: np.ndarray,
                         strides: Sequence[int], output_size: Sequence[int],
                         sampling_ratio: int, aligned: bool, finest_scale: float
                         ) -> np.ndarray:
    """mmdet ``SingleRoIExtractor.forward`` on one image: each RoI pooled on its level.

    Args:
        feats: per level ``[1, C, H, W]`` (or ``[C, H, W]``) maps, at least ``len(strides)``.
        boxes: ``[K, 4]`` RoIs in input pixels.
        strides: the extractor's ``featmap_strides`` (its ``num_inputs`` levels).
    """
    num_levels = len(strides)
    maps = [f[0] if f.ndim == 4 else f for f in feats[:num_levels]]
    out = np.zeros((len(boxes), maps[0].shape[0], *(int(v) for v in output_size)), _F32)
    if len(boxes) == 0:
        return out
    levels = map_roi_levels(boxes, num_levels, finest_scale)
    for i in range(num_levels):
        idx = np.nonzero(levels == i)[0]
        if len(idx):
            out[idx] = roi_align(maps[i], boxes[idx], output_size, 1.0 / strides[i],
                                 sampling_ratio, aligned)
    return out
