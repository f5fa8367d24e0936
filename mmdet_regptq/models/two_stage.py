"""Two-stage detectors (Faster / Mask R-CNN): RPN + RoI heads on FIXED proposals.

mmdet's own ``_forward`` selects proposals with the RPN and NMS, so the quantized model
would run its RoI head on other boxes than the FP model and the two outputs could not be
compared. :meth:`TwoStageAdapter.prepare_batch` therefore runs the FP model's RPN once per
calibration batch and stores its proposals in the batch (``batch['proposals']``, a list of
``[P_i, 4]``); :meth:`TwoStageAdapter.forward` runs backbone, neck, the RPN head (raw, no
NMS) and the RoI head on those stored proposals: the RoI outputs of the FP and the quantized
model stay aligned RoI by RoI, and the module calls are the same for every batch.
"""
from __future__ import annotations

import torch
from mmdet.structures.bbox import bbox2roi
from mmengine.logging import MMLogger
from mmengine.structures import InstanceData
from torch import Tensor, nn

from mmdet_regptq.calib.fgic import DetPredictions
from mmdet_regptq.models.base import (DETECTOR_ADAPTERS, DetectorAdapter, RawOutputs,
                                      branch_patterns, float_model, image_shapes, shape_list)
from mmdet_regptq.models.cascade_rpn import cascade_rpn_forward, is_cascade_rpn
from mmdet_regptq.models.dense import find_dense_decoder

__all__ = ['TwoStageAdapter', 'decode_rois']


def decode_rois(bbox_head: nn.Module, cls_score: Tensor, bbox_pred: Tensor | None,
                rois: Tensor, img_shapes: list[tuple[int, int]]) -> list[DetPredictions]:
    """RoI predictions per image, as ``BBoxHead._predict_by_feat_single`` before NMS.

    Args:
        bbox_head: the RoI bbox head (``bbox_coder``, ``num_classes``, ...).
        cls_score: ``[R, C + 1]`` logits (background last); ``[R, K (C + 1)]`` for a head
            with ``num_instance = K`` (CrowdDet), whose ``K`` predictions per RoI become
            ``K`` rows each.
        bbox_pred: ``[R, 4C]`` (or ``[R, 4]`` class-agnostic) deltas, or ``None``.
        rois: ``[R, 5]`` (image index, x1, y1, x2, y2).
        img_shapes: ``(h, w)`` per image.

    Returns:
        Per image: softmax scores ``[R_i, C + 1]`` (``sigmoid=False``) and boxes decoded
        from the RoIs, class-specific ``[R_i, C, 4]`` or class-agnostic ``[R_i, 4]``.
    """
    instances = int(getattr(bbox_head, 'num_instance', 1) or 1)
    if instances > 1:  # CrowdDet's MultiInstanceBBoxHead: K (scores, agnostic box) per RoI,
        # laid out as its own _predict_by_feat_single reads them
        cls_score = cls_score.reshape(-1, bbox_head.num_classes + 1)
        if bbox_pred is not None:
            bbox_pred = bbox_pred.reshape(-1, bbox_head.bbox_coder.encode_size)
        rois = rois.repeat_interleave(instances, dim=0)
    if bbox_head.custom_cls_channels:
        scores = bbox_head.loss_cls.get_activation(cls_score)
    else:
        scores = cls_score.softmax(-1)
    agnostic = bbox_head.reg_class_agnostic or bbox_pred is None or instances > 1
    out = []
    for i, shape in enumerate(img_shapes):
        keep = rois[:, 0] == i
        roi = rois[keep, 1:]
        if bbox_pred is None:
            boxes = roi
        else:
            per_roi = 1 if agnostic else bbox_head.num_classes
            deltas = bbox_pred[keep].reshape(-1, bbox_head.bbox_coder.encode_size)
            boxes = bbox_head.bbox_coder.decode(roi.repeat_interleave(per_roi, dim=0), deltas,
                                                max_shape=shape)
        boxes = boxes.reshape(roi.shape[0], 4) if agnostic else boxes.reshape(
            roi.shape[0], bbox_head.num_classes, 4)
        out.append(DetPredictions(scores[keep], boxes, shape, sigmoid=False))
    return out


def _with_reg(bbox_head: nn.Module) -> bool:
    return bool(getattr(bbox_head, 'with_reg', True))


def whole_image_box(like: Tensor, img_shape: tuple) -> Tensor:
    """``[1, 4]`` box covering an ``(h, w)`` image, dtype/device of ``like``."""
    h, w = img_shape[:2]
    return like.new_tensor([[0.0, 0.0, float(w), float(h)]])


@DETECTOR_ADAPTERS.register_module(name='TwoStageDetector')
class TwoStageAdapter(DetectorAdapter):
    """Faster / Mask R-CNN (``TwoStageDetector`` with an RPN and a standard RoI head).

    ``forward`` returns ``RawOutputs(outputs=(rpn_outs, roi_outs), img_shapes, rois)`` with
    ``rpn_outs = (cls_scores, bbox_preds)`` per level and ``roi_outs = (cls_score,
    bbox_pred[, mask_preds])`` from ``roi_head.forward`` (Mask R-CNN's mask head runs on the
    first 100 RoIs, as in mmdet). ``decode_stages`` gives ``'rpn'`` (objectness + decoded
    anchors) and ``'roi'`` (softmax scores + class-specific boxes from the fixed proposals);
    ``decode`` the RoI stage.

    Head: ``rpn_head`` and ``roi_head``; regression branch: the RPN's shared conv and
    ``rpn_reg``, and the RoI bbox head's shared and regression layers (``shared_convs``,
    ``shared_fcs``, ``reg_convs``, ``reg_fcs``, ``fc_reg``): every layer the box outputs
    depend on.

    Args:
        model: the detector.
        max_proposals: keep at most this many proposals per image (``None``: the RPN test
            config's ``max_per_img``).
    """

    head_scopes = ('rpn_head', 'roi_head')
    final_stage = 'roi'

    def __init__(self, model: nn.Module, *, max_proposals: int | None = None) -> None:
        super().__init__(model)
        if not getattr(model, 'with_rpn', False):
            raise ValueError(f'{type(model).__name__}: TwoStageAdapter needs an RPN '
                             '(detectors fed external proposals are not supported)')
        self.max_proposals = max_proposals

    def regression_layer_patterns(self) -> list[str]:
        return [branch_patterns('rpn_head', 'rpn_conv|rpn_reg'),
                branch_patterns('roi_head.bbox_head',
                                'shared_convs|shared_fcs|reg_convs|reg_fcs|fc_reg')]

    @torch.no_grad()
    def prepare_batch(self, data: dict) -> dict:
        """Preprocess and store the FP model's proposals (``batch['proposals']``)."""
        batch = super().prepare_batch(data)
        with float_model(self.model) as model:
            feats = model.extract_feat(batch['inputs'])
            results = model.rpn_head.predict(feats, batch['data_samples'], rescale=False)
        proposals = [r.bboxes[:self.max_proposals].detach().clone() for r in results]
        batch['proposals'] = [p if len(p) else whole_image_box(p, s.img_shape)
                              for p, s in zip(proposals, batch['data_samples'])]
        empty = sum(not len(p) for p in proposals)
        if empty:
            # cascade heads cannot refine zero RoIs (torch.cat of nothing); an empty set
            # comes from a random-init RPN or an image the RPN finds nothing in
            MMLogger.get_current_instance().warning(
                f'{type(self.model).__name__}: the FP RPN gave no proposal for {empty} '
                'calibration image(s); they get one whole-image proposal')
        return batch

    @staticmethod
    def features_and_rpn(model: nn.Module, batch: dict) -> tuple[tuple, tuple]:
        """Backbone + neck features and the raw RPN outputs of a batch that holds the FP
        proposals (:meth:`prepare_batch`)."""
        if 'proposals' not in batch:
            raise KeyError("the batch has no 'proposals'; build batches with the two-stage "
                           "adapter's prepare_batch (it stores the FP proposals)")
        feats = model.extract_feat(batch['inputs'])
        if is_cascade_rpn(model.rpn_head):   # no forward: its stages refine the anchors
            metas = [s.metainfo for s in batch['data_samples']]
            return feats, cascade_rpn_forward(model.rpn_head, feats, metas)
        return feats, model.rpn_head(feats)

    def final_bbox_head(self) -> nn.Module:
        """The box head whose coder decodes the RoI outputs."""
        return self.model.roi_head.bbox_head

    def forward(self, model: nn.Module, batch: dict) -> RawOutputs:
        feats, rpn_outs = self.features_and_rpn(model, batch)
        proposals = [InstanceData(bboxes=p) for p in batch['proposals']]
        roi_outs = model.roi_head.forward(feats, proposals, batch['data_samples'])
        return RawOutputs((rpn_outs, roi_outs),
                          image_shapes(batch['data_samples'], batch['inputs'].device),
                          bbox2roi(batch['proposals']))

    def box_forward(self, model: nn.Module, batch: dict) -> RawOutputs:
        """:meth:`forward` without the heads decoding never reads (a mask head, Grid
        R-CNN's grid head): RPN outputs and the box head's ``(cls_score[, bbox_pred])`` on
        the FP proposals. With masks it is the mask head that takes most of a Mask R-CNN
        tail forward (~60 % of Reg-PTQ's calibration time in the zoo sweep, measured with
        py-spy); the grid head's eight 576-channel convs on 14x14 RoIs are heavier still."""
        roi_head = model.roi_head
        if not (getattr(roi_head, 'with_mask', False) or hasattr(roi_head, 'grid_head')):
            return self.forward(model, batch)
        feats, rpn_outs = self.features_and_rpn(model, batch)
        rois = bbox2roi(batch['proposals'])
        bbox = roi_head._bbox_forward(feats, rois)
        outs = (bbox['cls_score'],) + ((bbox['bbox_pred'],) if _with_reg(roi_head.bbox_head)
                                       else ())
        return RawOutputs((rpn_outs, outs),
                          image_shapes(batch['data_samples'], batch['inputs'].device), rois)

    def logits(self, raw: RawOutputs) -> Tensor:
        return raw.outputs[1][0]

    def decode_stages(self, raw: RawOutputs) -> dict[str, list[DetPredictions]]:
        shapes = shape_list(raw.img_shapes)
        rpn_head = self.model.rpn_head
        (rpn_outs, roi_outs), bbox_head = raw.outputs, self.final_bbox_head()
        # without regression (Grid R-CNN: the grid head refines the boxes after NMS, by
        # the argmax of its heatmaps) the RoI stage's boxes are the proposals
        bbox_pred = roi_outs[1] if len(roi_outs) > 1 and _with_reg(bbox_head) else None
        return {'rpn': find_dense_decoder(rpn_head)(rpn_head, rpn_outs, shapes),
                'roi': decode_rois(bbox_head, roi_outs[0], bbox_pred, raw.rois, shapes)}

    @property
    def uses_sigmoid(self) -> bool:
        return False
