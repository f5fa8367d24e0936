"""Query-based two-stage detectors (Sparse R-CNN, QueryInst): learned proposals refined by
a cascade of dynamic-instance-interactive (DII) RoI heads.

There is no RPN forward: ``EmbeddingRPNHead`` only turns its learned proposal boxes and
features into per-image proposals (``predict``), so the proposals do not depend on the
image content and the FP and quantized model refine the same proposals query by query.
mmdet's ``SparseRoIHead.forward`` computes training targets (it needs ground truth), so
:meth:`QueryTwoStageAdapter.forward` runs the stages as ``SparseRoIHead.predict_bbox`` does
(``_bbox_forward`` per stage, the detached refined boxes feeding the next one) and, for
QueryInst, the last stage's mask head on the final boxes as ``predict_mask`` does.
"""
from __future__ import annotations

import torch
from mmdet.structures.bbox import bbox2roi
from torch import Tensor, nn

from mmdet_regptq.calib.fgic import DetPredictions
from mmdet_regptq.models.base import (DETECTOR_ADAPTERS, DetectorAdapter, RawOutputs,
                                      branch_patterns, clip_boxes, image_shapes, shape_list)

__all__ = ['QueryTwoStageAdapter']


@DETECTOR_ADAPTERS.register_module(name='SparseRCNN')
class QueryTwoStageAdapter(DetectorAdapter):
    """Sparse R-CNN / QueryInst (``SparseRCNN`` and subclasses).

    ``forward`` returns ``RawOutputs(outputs=(stages, masks), img_shapes)``: ``stages`` the
    ``(cls_score [B, N, C], boxes [B * N, 4])`` of every DII stage (boxes decoded
    x1y1x2y2 in input pixels), ``masks`` QueryInst's last-stage mask logits or ``None``.
    ``decode_stages`` gives the last stage as ``'det'`` (``N`` = number of proposals; sigmoid
    or softmax with the background last, from ``loss_cls.use_sigmoid``).

    Head: ``rpn_head`` (the proposal embeddings) and ``roi_head``; regression branch: the
    DII heads' ``reg_fcs`` and ``fc_reg``.
    """

    head_scopes = ('rpn_head', 'roi_head')

    def regression_layer_patterns(self) -> list[str]:
        return [branch_patterns('roi_head.bbox_head', 'reg_fcs|fc_reg')]

    def forward(self, model: nn.Module, batch: dict) -> RawOutputs:
        samples = batch['data_samples']
        feats = model.extract_feat(batch['inputs'])
        proposals = model.rpn_head.predict(feats, samples)
        boxes = [p.bboxes for p in proposals]
        object_feats = torch.cat([p.features[None] for p in proposals])
        metas = [s.metainfo for s in samples]
        roi_head, stages, result = model.roi_head, [], None
        for stage in range(roi_head.num_stages):
            result = roi_head._bbox_forward(stage, feats, bbox2roi(boxes), object_feats, metas)
            object_feats = result['object_feats']
            boxes = result['detached_proposals']
            stages.append((result['cls_score'], result['decoded_bboxes']))
        masks = None
        if getattr(roi_head, 'with_mask', False) and result is not None:
            attn = result['attn_feats'].flatten(0, 1)
            masks = roi_head._mask_forward(roi_head.num_stages - 1, feats, bbox2roi(boxes),
                                           attn)['mask_preds']
        return RawOutputs((tuple(stages), masks),
                          image_shapes(samples, batch['inputs'].device))

    @property
    def uses_sigmoid(self) -> bool:
        return bool(self.model.roi_head.bbox_head[-1].loss_cls.use_sigmoid)

    def logits(self, raw: RawOutputs) -> Tensor:
        return raw.outputs[0][-1][0].flatten(0, 1)

    def decode_stages(self, raw: RawOutputs) -> dict[str, list[DetPredictions]]:
        cls_score, boxes = raw.outputs[0][-1]
        sigmoid = self.uses_sigmoid
        scores = cls_score.sigmoid() if sigmoid else cls_score.softmax(-1)
        boxes = boxes.reshape(cls_score.shape[0], cls_score.shape[1], 4)
        return {'det': [DetPredictions(scores[i], clip_boxes(boxes[i], shape), shape, sigmoid)
                        for i, shape in enumerate(shape_list(raw.img_shapes))]}
