"""mmdet's test-time post-processing written as traceable tensor code for one image.

Each function mirrors the mmdet 3.3 code named in its docstring step for step, so that the
eager values equal mmdet's ``predict`` and the traced ONNX graph holds standard ops only:
``TopK`` (per-level pre-NMS top-k), ``NonZero`` + ``Gather`` (score threshold, minimum box
size), ``NonMaxSuppression`` (class-aware through mmcv's coordinate-offset trick of
``batched_nms``) and, in ``two_stage_graph.py``, ``RoiAlign``.
With ``nms='tensorrt'`` the NMS is TensorRT's built-in ``EfficientNMS_TRT`` plugin node
(mmdeploy's own TensorRT export uses ``mmdeploy::TRTBatchedNMS`` from mmdeploy's plugin
library instead; the built-in plugin needs no extra library).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ['delta_xywh_decode', 'distance_decode', 'decode', 'batched_nms_keep',
           'efficient_nms_trt', 'level_topk', 'size_mask', 'NMS_KINDS']

#: NMS flavours of an end-to-end graph: standard ONNX, or TensorRT's plugin.
NMS_KINDS = ('onnx', 'tensorrt')
#: ``DeltaXYWHBBoxCoder.decode``'s default ``wh_ratio_clip`` (what mmdet's heads pass).
WH_RATIO_CLIP = 16 / 1000


def delta_xywh_decode(priors: Tensor, deltas: Tensor, coder: object,
                      max_shape: Sequence[int]) -> Tensor:
    """``DeltaXYWHBBoxCoder.decode`` (mmdet ``delta2bbox``) for ``[N, 4]`` priors and
    ``[N, 4]`` deltas, clipped to ``max_shape = (H, W)`` when the coder clips.

    Written without mmdet's in-place slice ``clamp_`` (which the TorchScript exporter
    does not trace faithfully); same operations in the same order, so the same floats.
    """
    means = deltas.new_tensor(coder.means).view(1, -1)
    stds = deltas.new_tensor(coder.stds).view(1, -1)
    denorm = deltas * stds + means
    dxy, dwh = denorm[:, :2], denorm[:, 2:]
    pxy = (priors[:, :2] + priors[:, 2:]) * 0.5
    pwh = priors[:, 2:] - priors[:, :2]
    dxy_wh = pwh * dxy
    max_ratio = abs(math.log(WH_RATIO_CLIP))
    if coder.add_ctr_clamp:
        dxy_wh = torch.clamp(dxy_wh, max=coder.ctr_clamp, min=-coder.ctr_clamp)
        dwh = torch.clamp(dwh, max=max_ratio)
    else:
        dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    return _clip(boxes, max_shape) if coder.clip_border else boxes


def distance_decode(points: Tensor, distances: Tensor, coder: object,
                    max_shape: Sequence[int]) -> Tensor:
    """``DistancePointBBoxCoder.decode`` (mmdet ``distance2bbox``): ``[N, 2]`` points and
    ``[N, 4]`` (left, top, right, bottom) distances."""
    boxes = torch.stack([points[:, 0] - distances[:, 0], points[:, 1] - distances[:, 1],
                         points[:, 0] + distances[:, 2], points[:, 1] + distances[:, 3]], -1)
    return _clip(boxes, max_shape) if coder.clip_border else boxes


def _clip(boxes: Tensor, max_shape: Sequence[int]) -> Tensor:
    h, w = float(max_shape[0]), float(max_shape[1])
    x = boxes[:, 0::2].clamp(min=0, max=w)
    y = boxes[:, 1::2].clamp(min=0, max=h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], -1)


def decode(coder: object, priors: Tensor, deltas: Tensor, max_shape: Sequence[int]) -> Tensor:
    """Dispatch on the head's box coder (the two mmdet coders the bundled heads use)."""
    kind = type(coder).__name__
    if kind == 'DeltaXYWHBBoxCoder':
        return delta_xywh_decode(priors[:, :4], deltas, coder, max_shape)
    if kind == 'DistancePointBBoxCoder':
        return distance_decode(priors[:, :2], deltas, coder, max_shape)
    raise NotImplementedError(f'box coder {kind}: the end-to-end graph decodes '
                              'DeltaXYWHBBoxCoder and DistancePointBBoxCoder')


def level_topk(scores: Tensor, nms_pre: int) -> tuple[Tensor, Tensor]:
    """Top ``nms_pre`` of a level's flattened ``[P, C]`` scores, best first.

    mmdet's ``filter_scores_and_topk`` thresholds first and then keeps the top
    ``nms_pre``; the top ``nms_pre`` of all scores, thresholded afterwards, is the same set,
    and its ``k`` is static (``TopK`` with a constant ``k``).
    """
    flat = scores.reshape(-1)
    k = flat.shape[0] if nms_pre <= 0 else min(int(nms_pre), int(flat.shape[0]))
    return flat.topk(k)


def size_mask(boxes: Tensor, min_bbox_size: float) -> Tensor:
    """mmdet ``_bbox_post_process``'s ``(w > min_bbox_size) & (h > min_bbox_size)``."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return (w > min_bbox_size) & (h > min_bbox_size)


class _NmsFn(torch.autograd.Function):
    """mmcv's NMS kernel (mmdet's ``batched_nms`` runs it); exports as ONNX
    ``NonMaxSuppression`` on one batch and one class, with no score threshold.

    mmdeploy's ``ONNXNMSop`` has the same symbolic but calls mmcv's ``NMSop`` (another
    autograd function) in its forward, which torch 2.14's TorchScript exporter cannot
    nest (``_jit_pass_peephole``: "Argument passed to at() was not in the map").
    """

    @staticmethod
    def forward(ctx: Any, boxes: Tensor, scores: Tensor, iou_threshold: float,
                max_num: int) -> Tensor:
        from mmcv.utils import ext_loader

        ext = ext_loader.load_ext('_ext', ['nms'])
        keep = ext.nms(boxes.contiguous(), scores.contiguous(),
                       iou_threshold=float(iou_threshold), offset=0)
        return keep[:max_num]

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, iou_threshold: float, max_num: int) -> Any:
        boxes3 = g.op('Unsqueeze', boxes, g.op('Constant', value_t=torch.tensor([0])))
        scores3 = g.op('Unsqueeze', scores, g.op('Constant', value_t=torch.tensor([0, 1])))
        selected = g.op('NonMaxSuppression', boxes3, scores3,
                        g.op('Constant', value_t=torch.tensor([max_num], dtype=torch.long)),
                        g.op('Constant', value_t=torch.tensor([iou_threshold],
                                                              dtype=torch.float)))
        column = g.op('Gather', selected, g.op('Constant', value_t=torch.tensor(2)), axis_i=1)
        return column


def batched_nms_keep(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                     max_num: int) -> Tensor:
    """Indices kept by mmcv's ``batched_nms`` (class-aware, ``idxs`` = class or level),
    best first, at most ``max_num``.

    The classes are separated as mmcv does it: every box is offset by ``idx *
    (max coordinate + 1)`` and one NMS runs on all of them (the same floats, so the same
    IoUs). The maximum includes 0 so that an empty input stays defined in ONNX; clipped
    boxes are >= 0, so the offset is mmcv's.
    """
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes.dtype) * (max_coordinate + 1)
    boxes_for_nms = boxes + offsets[:, None]
    return _NmsFn.apply(boxes_for_nms, scores, float(iou_threshold), int(max_num))


class _EfficientNmsTrtFn(torch.autograd.Function):
    """TensorRT's built-in ``EfficientNMS_TRT`` plugin (class-aware NMS, top ``max_num``);
    eager: mmcv's NMS per class, rows padded with zeros to ``max_num``."""

    @staticmethod
    def forward(ctx: Any, boxes: Tensor, scores: Tensor, iou_threshold: float,
                score_threshold: float, max_num: int) -> tuple[Tensor, ...]:
        b, s = boxes[0], scores[0]                                 # [N, 4], [N, C]
        flat = s.reshape(-1)
        labels = torch.arange(s.shape[1]).repeat(s.shape[0])
        rows = torch.arange(s.shape[0]).repeat_interleave(s.shape[1])
        valid = torch.nonzero(flat > score_threshold).reshape(-1)
        keep = batched_nms_keep(b[rows[valid]], flat[valid], labels[valid], iou_threshold,
                                max_num)
        keep = valid[keep]
        count = keep.numel()
        det_boxes = boxes.new_zeros(1, max_num, 4)
        det_scores = scores.new_zeros(1, max_num)
        det_classes = torch.zeros(1, max_num, dtype=torch.int32)
        det_boxes[0, :count] = b[rows[keep]]
        det_scores[0, :count] = flat[keep]
        det_classes[0, :count] = labels[keep].int()
        return (torch.tensor([[count]], dtype=torch.int32), det_boxes, det_scores, det_classes)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, iou_threshold: float, score_threshold: float,
                 max_num: int) -> Any:
        outs = g.op('TRT::EfficientNMS_TRT', boxes, scores, background_class_i=-1,
                    box_coding_i=0, iou_threshold_f=iou_threshold, max_output_boxes_i=max_num,
                    plugin_version_s='1', score_activation_i=0,
                    score_threshold_f=score_threshold, outputs=4)
        kind = boxes.type()
        shapes = ([1, 1], [1, max_num, 4], [1, max_num], [1, max_num])
        dtypes = (torch.int32, torch.float32, torch.float32, torch.int32)
        for out, shape, dtype in zip(outs, shapes, dtypes):
            out.setType(kind.with_dtype(dtype).with_sizes(shape))
        return outs


def efficient_nms_trt(boxes: Tensor, scores: Tensor, iou_threshold: float,
                      score_threshold: float, max_num: int) -> tuple[Tensor, Tensor]:
    """``EfficientNMS_TRT`` on ``boxes [1, N, 4]`` and ``scores [1, N, C]`` →
    MMDeploy's ``dets [1, max_num, 5]``, ``labels [1, max_num]`` (zero padded)."""
    _, det_boxes, det_scores, det_classes = _EfficientNmsTrtFn.apply(
        boxes, scores, float(iou_threshold), float(score_threshold), int(max_num))
    dets = torch.cat([det_boxes, det_scores.unsqueeze(-1)], dim=-1)
    return dets, det_classes.long()
