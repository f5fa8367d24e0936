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

from typing import Sequence

import numpy as np

__all__ = ['roi_align', 'map_roi_levels', 'extract_roi_features']

_F32 = np.float32


def _axis_weights(start: np.ndarray, bin_size: np.ndarray, grid: np.ndarray, pooled: int,
                  size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis of every RoI: ``[K, pooled, size]`` summed sample weights per output bin and
    the ``[first, last)`` index window each RoI touches (module doc)."""
    num = len(start)
    steps = max(int(grid.max(initial=0)), 1)
    sample = np.arange(steps, dtype=_F32) + _F32(0.5)
    # mmcv: start + ph * bin_size + (i + 0.5) * bin_size / grid, in float32, in this order
    pos = (start[:, None, None] + np.arange(pooled, dtype=_F32)[None, :, None]
           * bin_size[:, None, None]
           + sample[None, None] * bin_size[:, None, None]
           / np.maximum(grid, 1).astype(_F32)[:, None, None]).astype(_F32)
    valid = (np.arange(steps)[None, None] < grid[:, None, None]) & (pos >= -1) & \
        (pos <= size)
    pos = np.maximum(pos, _F32(0))
    low = np.minimum(pos, _F32(size)).astype(np.int64)
    last = low >= size - 1
    low = np.where(last, size - 1, low)
    high = np.where(last, size - 1, low + 1)
    frac = np.where(last, _F32(0), pos - low.astype(_F32)).astype(_F32)
    rows = (np.arange(num)[:, None, None] * pooled + np.arange(pooled)[None, :, None]) * size
    index = np.concatenate([(rows + low)[valid], (rows + high)[valid]])
    weight = np.concatenate([(_F32(1) - frac)[valid], frac[valid]])
    weights = np.bincount(index, weight, minlength=num * pooled * size).astype(_F32)
    first = np.where(valid, low, size).min(axis=(1, 2))
    end = np.where(valid, high + 1, 0).max(axis=(1, 2))
    return weights.reshape(num, pooled, size), first, np.maximum(end, first)


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
    if len(boxes) == 0:
        return out
    scaled = np.asarray(boxes, _F32).reshape(-1, 4) * _F32(spatial_scale) - \
        (_F32(0.5) if aligned else _F32(0))
    roi_w, roi_h = scaled[:, 2] - scaled[:, 0], scaled[:, 3] - scaled[:, 1]
    if not aligned:
        roi_w, roi_h = np.maximum(roi_w, _F32(1)), np.maximum(roi_h, _F32(1))
    bin_h, bin_w = roi_h / _F32(out_h), roi_w / _F32(out_w)
    if sampling_ratio > 0:
        grid_h = grid_w = np.full(len(boxes), sampling_ratio, np.int64)
    else:
        grid_h, grid_w = (np.ceil(b).astype(np.int64) for b in (bin_h, bin_w))
    count = np.maximum(grid_h * grid_w, 1).astype(_F32)
    wy, y0, y1 = _axis_weights(scaled[:, 1], bin_h, grid_h, out_h, height)
    wx, x0, x1 = _axis_weights(scaled[:, 0], bin_w, grid_w, out_w, width)
    # per RoI on its window of the map in place (no copy of the window): [out_h, h] @
    # [C, h, w] → [C, out_h, w] (a GEMM per channel), then one [C * out_h, w] @ [w, out_w]
    # GEMM into the output
    wxt = np.ascontiguousarray(wx.transpose(0, 2, 1)) / count[:, None, None]
    todo = np.nonzero((y1 > y0) & (x1 > x0))[0]
    flat = out.reshape(len(boxes), channels * out_h, out_w)
    for k, a, b, c, d in zip(todo.tolist(), y0[todo].tolist(), y1[todo].tolist(),
                             x0[todo].tolist(), x1[todo].tolist()):
        rows = np.matmul(wy[k, :, a:b], feat[:, a:b, c:d]).reshape(-1, d - c)
        np.matmul(rows, wxt[k, c:d], out=flat[k])
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
