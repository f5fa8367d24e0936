"""A stand-in for mmcv's compiled ``mmcv._ext``: NMS and RoIAlign from torchvision.

Why: mmcv 2.1 ships only as source, and its compiled ops must match the exact torch they
were built against. The GPU machine this project borrows has its own torch (another
version, another Python), no registry, and minutes of time — too little to build mmcv
there. The bundled detectors need only two of mmcv's ops (NMS for predict and the RPN,
RoIAlign for the RoI head), and torchvision on that machine has both, on CUDA. Copied as
``mmcv/_ext.py`` into a pure-Python mmcv, this module satisfies ``mmcv.utils.ext_loader``
(every other op name resolves to a function that raises when called).

Checked against mmcv's own compiled ops on CPU by ``tests/test_mmcv_ext_torchvision.py``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torchvision.ops import nms as _tv_nms
from torchvision.ops import roi_align as _tv_roi_align

_AVG = 1  # mmcv's pool_mode code for 'avg' (0 = 'max')


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int = 0) -> Tensor:
    """Indices kept by NMS, by decreasing score (mmcv's ``ext_module.nms``)."""
    if offset not in (0, 1):
        raise ValueError(f'nms offset={offset!r}: allowed 0 or 1')
    if offset == 1:  # mmcv's legacy "+1" box sizes: enlarge the boxes by one pixel
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:4] + 1], dim=1)
    return _tv_nms(boxes[:, :4].float(), scores.float(), float(iou_threshold))


def _check_avg(pool_mode: int) -> None:
    if pool_mode != _AVG:
        raise NotImplementedError(
            f"roi_align pool_mode={pool_mode}: only 'avg' (1) has a torchvision fallback")


def roi_align_forward(input: Tensor, rois: Tensor, output: Tensor, argmax_y: Tensor,
                      argmax_x: Tensor, *, aligned_height: int, aligned_width: int,
                      spatial_scale: float, sampling_ratio: int, pool_mode: int,
                      aligned: bool) -> None:
    """Fill ``output`` like mmcv's ``roi_align_forward`` (``rois``: ``[K, 5]`` idx+xyxy)."""
    _check_avg(pool_mode)
    output.copy_(_tv_roi_align(input, rois.to(input.dtype), (aligned_height, aligned_width),
                               spatial_scale, sampling_ratio, aligned))


def roi_align_backward(grad_output: Tensor, rois: Tensor, argmax_y: Tensor,
                       argmax_x: Tensor, grad_input: Tensor, *, aligned_height: int,
                       aligned_width: int, spatial_scale: float, sampling_ratio: int,
                       pool_mode: int, aligned: bool) -> None:
    """Fill ``grad_input`` like mmcv's ``roi_align_backward``."""
    _check_avg(pool_mode)
    batch, channels, height, width = grad_input.shape
    grad = torch.ops.torchvision._roi_align_backward(
        grad_output, rois.to(grad_output.dtype), spatial_scale, aligned_height,
        aligned_width, batch, channels, height, width, sampling_ratio, aligned)
    grad_input.copy_(grad)


def __getattr__(name: str) -> Callable[..., Any]:
    """Any other mmcv op: importable (``ext_loader`` checks names), fails when called."""
    if name.startswith('__'):
        raise AttributeError(name)

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f'mmcv op {name!r} has no torchvision fallback in {__name__} (only nms and '
            'roi_align): build mmcv with its compiled ops for this model')

    missing.__name__ = name
    return missing
