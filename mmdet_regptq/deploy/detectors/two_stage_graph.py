"""A two-stage detector (Faster R-CNN) as ONE end-to-end graph: image → ``dets`` +
``labels``, with the RPN's decoding and NMS, RoIAlign and the RoI head's decoding and NMS
inside it.

The proposal count is data dependent; ONNX Runtime runs the graph with dynamic shapes
(``NonZero``, ``NonMaxSuppression``, ``RoiAlign`` on however many proposals there are).
Every step mirrors mmdet 3.3 (``RPNHead._predict_by_feat_single`` /
``_bbox_post_process``, ``SingleRoIExtractor.forward``, ``BBoxHead._predict_by_feat_single``
+ ``multiclass_nms``), so the eager output equals the fake-quant model's ``predict``. The
RoIAlign of each FPN level is ONNX ``RoiAlign`` (``coordinate_transformation_mode
'half_pixel'`` for mmcv's ``aligned=True``) on the RoIs mmdet maps to that level
(``NonZero`` + ``Gather``), the results put back in the RoIs' order (``TopK``-based argsort
+ ``Gather``). Pooling every RoI on every level and selecting would give the same values
at about 4x the RoIAlign time (43 ms of the bundled Faster R-CNN's 169 ms at 512x512).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mmdet_regptq.deploy.detectors.end2end import check_nms_kind, nms_outputs
from mmdet_regptq.deploy.detectors.postprocess import (batched_nms_keep, decode,
                                                       delta_xywh_decode, size_mask)
from mmdet_regptq.deploy.detectors.two_stage import check_deployable, is_two_stage

__all__ = ['TwoStageEnd2End', 'roi_align']


class _RoiAlignFn(torch.autograd.Function):
    """mmcv ``roi_align`` (the fake-quant model's op) that exports as ONNX ``RoiAlign``."""

    @staticmethod
    def forward(ctx: Any, feat: Tensor, boxes: Tensor, batch_idx: Tensor, out_h: int,
                out_w: int, spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
        from mmcv.ops import roi_align as mmcv_roi_align

        rois = torch.cat([batch_idx.to(boxes.dtype)[:, None], boxes], dim=1)
        return mmcv_roi_align(feat, rois, (out_h, out_w), spatial_scale, sampling_ratio,
                              'avg', aligned)

    @staticmethod
    def symbolic(g: Any, feat: Any, boxes: Any, batch_idx: Any, out_h: int, out_w: int,
                 spatial_scale: float, sampling_ratio: int, aligned: bool) -> Any:
        mode = 'half_pixel' if aligned else 'output_half_pixel'
        return g.op('RoiAlign', feat, boxes, batch_idx, mode_s='avg', output_height_i=out_h,
                    output_width_i=out_w, spatial_scale_f=spatial_scale,
                    sampling_ratio_i=sampling_ratio, coordinate_transformation_mode_s=mode)


def roi_align(layer: nn.Module, feat: Tensor, boxes: Tensor, batch_idx: Tensor) -> Tensor:
    """An mmcv ``RoIAlign`` layer (average pooling) on ``boxes [K, 4]`` of batch
    ``batch_idx [K]`` (int64)."""
    if getattr(layer, 'pool_mode', 'avg') != 'avg':
        raise NotImplementedError('RoIAlign with max pooling has no ONNX RoiAlign '
                                  'equivalent with mmcv\'s values')
    out_h, out_w = (int(v) for v in layer.output_size)
    return _RoiAlignFn.apply(feat, boxes, batch_idx, out_h, out_w, float(layer.spatial_scale),
                             int(layer.sampling_ratio), bool(layer.aligned))


class TwoStageEnd2End(nn.Module):
    """Faster R-CNN (one box head, no mask head) as one graph (module doc).

    Args:
        detector: an mmdet two-stage detector (float or quantized) in eval mode.
        input_shape: the static ``(H, W)`` of the graph.
        nms: ``'onnx'`` or ``'tensorrt'`` (the final NMS; ``end2end.nms_outputs``).
    """

    def __init__(self, detector: nn.Module, input_shape: Sequence[int], nms: str = 'onnx'
                 ) -> None:
        super().__init__()
        if not is_two_stage(detector):
            raise TypeError(f'{type(detector).__name__} has no rpn_head + roi_head')
        check_deployable(detector)
        self.detector = detector
        self.nms = check_nms_kind(nms)
        self.input_shape = (int(input_shape[0]), int(input_shape[1]))
        self.rpn_cfg = dict(detector.rpn_head.test_cfg)
        self.rcnn_cfg = dict(detector.roi_head.test_cfg)
        with torch.no_grad():
            feats = detector.extract_feat(torch.zeros(1, 3, *self.input_shape))
            scores, _ = detector.rpn_head(feats)
        priors = detector.rpn_head.prior_generator.grid_priors(
            [s.shape[-2:] for s in scores], dtype=torch.float32, device='cpu')
        self.num_levels = len(priors)
        for i, p in enumerate(priors):
            self.register_buffer(f'priors{i}', p, persistent=False)

    def proposals(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor]) -> Tensor:
        """``[K, 4]`` RPN proposals, best first (mmdet ``RPNHead`` predict, one image)."""
        head = self.detector.rpn_head
        nms_pre = int(self.rpn_cfg.get('nms_pre', -1))
        boxes, scores, levels = [], [], []
        for level, (cls, reg) in enumerate(zip(cls_scores, bbox_preds)):
            score = cls[0].permute(1, 2, 0).reshape(-1, head.cls_out_channels)
            score = (score.sigmoid() if head.use_sigmoid_cls else score.softmax(-1)[:, :-1])
            score = score.reshape(-1)
            deltas = reg[0].permute(1, 2, 0).reshape(-1, head.bbox_coder.encode_size)
            priors = getattr(self, f'priors{level}')
            if 0 < nms_pre < score.shape[0]:
                score, idx = score.topk(nms_pre)
                deltas, priors = deltas[idx], priors[idx]
            boxes.append(decode(head.bbox_coder, priors, deltas, self.input_shape))
            scores.append(score)
            levels.append(torch.full_like(score, level, dtype=torch.int64))
        boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        min_size = self.rpn_cfg.get('min_bbox_size', -1)
        if min_size is not None and min_size >= 0:
            idx = torch.nonzero(size_mask(boxes, min_size)).reshape(-1)
            boxes, scores, levels = boxes[idx], scores[idx], levels[idx]
        keep = batched_nms_keep(boxes, scores, levels, float(self.rpn_cfg['nms']['iou_threshold']),
                                int(self.rpn_cfg.get('max_per_img', 1000)))
        return boxes[keep]

    def roi_features(self, feats: Sequence[Tensor], boxes: Tensor) -> Tensor:
        """mmdet ``SingleRoIExtractor.forward`` on one image's boxes: level by RoI scale."""
        extractor = self.detector.roi_head.bbox_roi_extractor
        num_levels = extractor.num_inputs
        batch_idx = torch.zeros_like(boxes[:, 0], dtype=torch.int64)
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        target = torch.floor(torch.log2(scale / extractor.finest_scale + 1e-6))
        target = target.clamp(min=0, max=num_levels - 1)
        pooled, order = [], []
        for i in range(num_levels):       # each RoI pooled on its own level only
            idx = torch.nonzero(target == i).reshape(-1)
            pooled.append(roi_align(extractor.roi_layers[i], feats[i], boxes[idx],
                                    batch_idx[idx]))
            order.append(idx)
        # back to the RoIs' order (mmdet writes each level's results into its rows)
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]

    def detections(self, proposals: Tensor, cls_score: Tensor, bbox_pred: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """mmdet ``BBoxHead._predict_by_feat_single`` + ``multiclass_nms`` (one image)."""
        bbox_head = self.detector.roi_head.bbox_head
        num_classes = bbox_head.num_classes
        scores = cls_score.softmax(-1)[:, :-1].reshape(-1)
        per_class = 1 if bbox_head.reg_class_agnostic else num_classes
        # repeat_interleave / expand written as broadcast adds of zeros (exact): TVM's Relax
        # ONNX frontend cannot convert an Expand to a data-dependent shape
        rois = (proposals.unsqueeze(1) + proposals.new_zeros(1, per_class, 1)).reshape(-1, 4)
        deltas = bbox_pred.reshape(-1, bbox_head.bbox_coder.encode_size)
        boxes = delta_xywh_decode(rois, deltas, bbox_head.bbox_coder, self.input_shape)
        if per_class != num_classes:
            boxes = boxes.reshape(-1, 1, 4) + boxes.new_zeros(1, num_classes, 1)
        boxes = boxes.reshape(-1, 4)
        classes = torch.arange(num_classes)
        labels = (torch.zeros_like(cls_score[:, :-1], dtype=torch.int64) + classes).reshape(-1)
        valid = scores > float(self.rcnn_cfg.get('score_thr', 0.0))
        return nms_outputs(boxes, scores, labels, valid, self.rcnn_cfg, num_classes, self.nms)

    @property
    def max_per_img(self) -> int:
        """Most detections per image (the static row count of a TensorRT graph)."""
        return int(self.rcnn_cfg.get('max_per_img', 100))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.detector.extract_feat(x)
        cls_scores, bbox_preds = self.detector.rpn_head(feats)
        proposals = self.proposals(cls_scores, bbox_preds)
        roi_feats = self.roi_features(feats, proposals)
        cls_score, bbox_pred = self.detector.roi_head.bbox_head(roi_feats)
        return self.detections(proposals, cls_score, bbox_pred)
