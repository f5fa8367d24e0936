"""Query-based detectors (the DETR family: DETR, Deformable DETR, Conditional / DAB DETR,
DINO): per-query class scores and boxes from the last decoder layer."""
from __future__ import annotations

import torch
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from torch import Tensor

from mmdet_regptq.calib.fgic import DetPredictions
from mmdet_regptq.models.base import (DETECTOR_ADAPTERS, DetectorAdapter, RawOutputs,
                                      branch_patterns, clip_boxes, shape_list)

__all__ = ['DETRAdapter']


@DETECTOR_ADAPTERS.register_module(name='DetectionTransformer')
class DETRAdapter(DetectorAdapter):
    """``forward`` = ``model._forward``: backbone, neck, transformer encoder/decoder and
    ``bbox_head.forward`` without post-processing, i.e. ``(cls [L, B, Q, C'], boxes
    [L, B, Q, 4])`` over the ``L`` decoder layers, boxes normalised ``(cx, cy, w, h)``.

    ``decode``: the last layer; scores ``sigmoid`` (``loss_cls.use_sigmoid``: Deformable
    DETR, DINO, ...) or softmax with the no-object class last (DETR); boxes converted to
    x1y1x2y2, scaled to the image size and clipped, as ``DETRHead._predict_by_feat_single``.
    ``N`` = number of queries.

    Head (the paper quantizes encoder and decoder as heads): ``encoder``, ``decoder``,
    ``bbox_head``; regression branch: ``bbox_head``'s ``reg_ffn`` / ``fc_reg`` /
    ``reg_branches``.
    """

    head_scopes = ('encoder', 'decoder', 'bbox_head')

    def regression_layer_patterns(self) -> list[str]:
        return [branch_patterns('bbox_head', 'reg_ffn|fc_reg|reg_branches')]

    @property
    def uses_sigmoid(self) -> bool:
        return bool(self.model.bbox_head.loss_cls.use_sigmoid)

    def logits(self, raw: RawOutputs) -> Tensor:
        return raw.outputs[0][-1].flatten(0, 1)

    def decode_stages(self, raw: RawOutputs) -> dict[str, list[DetPredictions]]:
        cls, boxes = raw.outputs[0][-1], raw.outputs[1][-1]                  # [B, Q, *]
        sigmoid = self.uses_sigmoid
        scores = cls.sigmoid() if sigmoid else cls.softmax(-1)
        out = []
        for i, (h, w) in enumerate(shape_list(raw.img_shapes)):
            xyxy = bbox_cxcywh_to_xyxy(boxes[i]) * torch.tensor(
                [w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            out.append(DetPredictions(scores[i], clip_boxes(xyxy, (h, w)), (h, w), sigmoid))
        return {'det': out}
