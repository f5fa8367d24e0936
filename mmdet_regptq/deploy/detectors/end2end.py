"""End-to-end graphs: image ``[1, 3, H, W]`` → ``dets [1, N, 5]`` (x1, y1, x2, y2, score)
+ ``labels [1, N]``, MMDeploy's output convention, with decoding, score threshold, pre-NMS
top-k and NMS inside the graph.

The post-processing follows mmdet's own ``predict_by_feat`` (``postprocess.py``), with the
settings of the model config's ``test_cfg``, so a deployed graph gives the detections of
the fake-quant model's ``predict`` (boxes in the network input's coordinates: the caller
divides by the resize scale, as mmdet's ``rescale=True`` does). Boxes are clipped to the
graph's static input shape (MMDeploy does the same); mmdet clips to the resized image,
which differs only for an image smaller than the static shape.

Single-stage dense heads: :class:`DenseEnd2End`; two-stage detectors (RPN + RoI head, RoIAlign
inside the graph): :class:`~mmdet_regptq.deploy.detectors.two_stage_graph.TwoStageEnd2End`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mmdet_regptq.deploy.detectors.postprocess import (NMS_KINDS, batched_nms_keep, decode,
                                                       efficient_nms_trt, level_topk,
                                                       size_mask)

__all__ = ['DenseEnd2End', 'END2END_OUTPUTS', 'nms_outputs', 'check_nms_kind']

#: Output names of an end-to-end graph (MMDeploy's).
END2END_OUTPUTS = ('dets', 'labels')


def check_nms_kind(nms: str) -> str:
    if nms not in NMS_KINDS:
        raise ValueError(f'nms={nms!r}; allowed: {", ".join(NMS_KINDS)}')
    return nms


def nms_outputs(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, cfg: dict,
                num_classes: int, nms: str = 'onnx') -> tuple[Tensor, Tensor]:
    """Class-aware NMS of the candidates → ``(dets [1, N, 5], labels [1, N])``.

    Args:
        boxes: ``[M, 4]`` decoded candidate boxes.
        scores: ``[M]`` their final scores.
        labels: ``[M]`` their classes.
        valid: ``[M]`` which candidates passed the score threshold / size filter.
        cfg: the head's ``test_cfg`` (``nms.iou_threshold``, ``max_per_img``).
        num_classes: classes of the head.
        nms: ``'onnx'`` (``NonMaxSuppression``; exactly mmdet's ``batched_nms``) or
            ``'tensorrt'`` (TensorRT's ``EfficientNMS_TRT`` plugin, static
            ``max_per_img`` rows padded with zeros, as MMDeploy's TensorRT outputs).
    """
    iou = float(cfg['nms']['iou_threshold'])
    max_num = int(cfg.get('max_per_img', 100))
    if nms == 'tensorrt':
        masked = torch.where(valid, scores, torch.zeros_like(scores))
        classes = torch.arange(num_classes, device=labels.device)
        matrix = masked[:, None] * (labels[:, None] == classes[None]).to(scores.dtype)
        return efficient_nms_trt(boxes[None], matrix[None], iou, 0.0, max_num)
    idx = torch.nonzero(valid).reshape(-1)
    boxes, scores, labels = boxes[idx], scores[idx], labels[idx]
    keep = batched_nms_keep(boxes, scores, labels, iou, max_num)
    dets = torch.cat([boxes[keep], scores[keep].unsqueeze(1)], dim=1)
    return dets.unsqueeze(0), labels[keep].unsqueeze(0)


class DenseEnd2End(nn.Module):
    """A single-stage dense detector (RetinaNet, FCOS, ...) as one end-to-end graph.

    mmdet ``BaseDenseHead._predict_by_feat_single`` + ``_bbox_post_process`` per image:
    per level sigmoid (or softmax) scores, the top ``nms_pre`` (prior, class) pairs,
    decoding with the head's box coder, score threshold on the class score, then the score
    factor (FCOS's centerness) multiplied in, the minimum box size, class-aware NMS and
    ``max_per_img``.

    Args:
        detector: an mmdet single-stage detector (float or quantized) in eval mode.
        input_shape: the static ``(H, W)`` of the graph.
        nms: ``'onnx'`` or ``'tensorrt'`` (see :func:`nms_outputs`).
    """

    def __init__(self, detector: nn.Module, input_shape: Sequence[int], nms: str = 'onnx'
                 ) -> None:
        super().__init__()
        head = getattr(detector, 'bbox_head', None)
        if head is None or hasattr(detector, 'roi_head') or \
                not hasattr(head, 'prior_generator') or not hasattr(head, 'bbox_coder'):
            raise NotImplementedError(
                f'{type(detector).__name__}: the dense end-to-end graph needs a bbox_head with '
                'a prior_generator and a bbox_coder (RetinaNet, FCOS, ...) and no roi_head')
        if type(head).__name__ == 'YOLOv5Head':
            raise NotImplementedError('YOLOv5Head decodes its own way: use '
                                      'detectors.yolov5_graph.YOLOv5End2End')
        self.detector = detector
        self.head = head
        self.nms = check_nms_kind(nms)
        self.input_shape = (int(input_shape[0]), int(input_shape[1]))
        self.cfg = dict(head.test_cfg)
        with torch.no_grad():
            outs = detector._forward(torch.zeros(1, 3, *self.input_shape))
        self.with_score_factors = len(outs) == 3
        sizes = [t.shape[-2:] for t in outs[0]]
        priors = head.prior_generator.grid_priors(sizes, dtype=torch.float32, device='cpu')
        self.num_levels = len(priors)
        for i, p in enumerate(priors):
            self.register_buffer(f'priors{i}', p, persistent=False)

    def level_candidates(self, level: int, cls_score: Tensor, bbox_pred: Tensor,
                         score_factor: Tensor | None) -> tuple[Tensor, ...]:
        """``(boxes, scores, labels, passed threshold)`` of one level's top ``nms_pre``."""
        head = self.head
        scores = cls_score[0].permute(1, 2, 0).reshape(-1, head.cls_out_channels)
        scores = scores.sigmoid() if head.use_sigmoid_cls else scores.softmax(-1)[:, :-1]
        deltas = bbox_pred[0].permute(1, 2, 0).reshape(-1, head.bbox_coder.encode_size)
        top, idx = level_topk(scores, self.cfg.get('nms_pre', -1))
        num_classes = scores.shape[1]
        prior_idx = torch.div(idx, num_classes, rounding_mode='floor')
        labels = idx - prior_idx * num_classes
        priors = getattr(self, f'priors{level}')
        boxes = decode(head.bbox_coder, priors[prior_idx], deltas[prior_idx], self.input_shape)
        passed = top > float(self.cfg.get('score_thr', 0.0))
        if score_factor is not None:
            factor = score_factor[0].permute(1, 2, 0).reshape(-1).sigmoid()
            top = top * factor[prior_idx]
        return boxes, top, labels, passed

    @property
    def max_per_img(self) -> int:
        """Most detections per image (the static row count of a TensorRT graph)."""
        return int(self.cfg.get('max_per_img', 100))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        outs = self.detector._forward(x)
        factors = outs[2] if self.with_score_factors else [None] * self.num_levels
        parts = [self.level_candidates(i, c, b, f)
                 for i, (c, b, f) in enumerate(zip(outs[0], outs[1], factors))]
        boxes, scores, labels, valid = (torch.cat(list(t)) for t in zip(*parts))
        min_size = self.cfg.get('min_bbox_size', -1)
        if min_size is not None and min_size >= 0:
            valid = valid & size_mask(boxes, min_size)
        return nms_outputs(boxes, scores, labels, valid, self.cfg, self.head.num_classes,
                           self.nms)
