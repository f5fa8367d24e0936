"""Cascade RoI heads (Cascade R-CNN, HTC, DetectoRS): the stages run as mmdet predicts.

``CascadeRoIHead.predict_bbox`` runs its stages through ``_refine_roi``: stage ``t`` pools
the RoIs that stage ``t - 1`` refined with the deltas of its argmax class; the class
scores are the mean of every stage's logits, and the boxes are the last stage's deltas
decoded from the RoIs that stage saw. :class:`CascadeAdapter` runs exactly that on the FP
model's fixed proposals (see ``two_stage.py``). Prediction ``i`` of two states of the model
then comes from the same proposal, and FGIC compares the final scores and boxes, which is
the pair mmdet's NMS would see. The refined RoIs are the model's own (they depend on the
earlier stages' outputs), so they travel in ``RawOutputs.rois``.

The heads decoded here are those whose ``_bbox_forward`` takes ``(stage, x, rois[,
semantic_feat][, glbctx_feat])``: ``CascadeRoIHead``, HTC's ``HybridTaskCascadeRoIHead``
and ``SCNetRoIHead``; their semantic / global context features are computed as their
``predict`` does. Other subclasses keep ``roi_head.forward``, and Reg-PTQ falls back to
the MSE of those outputs.
"""
from __future__ import annotations

import torch
from mmdet.structures.bbox import bbox2roi
from torch import nn

from mmdet_regptq.calib.fgic import DetPredictions
from mmdet_regptq.models.base import DETECTOR_ADAPTERS, RawOutputs, image_shapes
from mmdet_regptq.models.two_stage import TwoStageAdapter

__all__ = ['CascadeAdapter']

#: RoI heads whose stages ``CascadeAdapter`` runs and decodes itself.
REFINED_HEADS = ('CascadeRoIHead', 'HybridTaskCascadeRoIHead', 'SCNetRoIHead')


@DETECTOR_ADAPTERS.register_module(name='CascadeRCNN')
class CascadeAdapter(TwoStageAdapter):
    """Cascade R-CNN and its subclasses (HTC, DetectoRS' cascades, SCNet).

    ``forward`` returns ``RawOutputs(outputs=(rpn_outs, (cls_score, bbox_pred)), img_shapes,
    rois)``: ``cls_score [R, C + 1]`` the stages' mean logits, ``bbox_pred`` the last
    stage's deltas, ``rois [R, 5]`` the RoIs the last stage ran on, in the order of the FP
    proposals. It also runs the mask heads (their layers get calibrated), which
    ``box_forward`` (Reg-PTQ's tail forwards) leaves out. ``decode_stages`` gives ``'rpn'``
    and ``'roi'`` (softmax scores, boxes decoded by the last stage's coder), as
    :class:`TwoStageAdapter` does.

    Regression branch: :class:`TwoStageAdapter`'s patterns, which match every stage's
    shared and regression layers (the refined RoIs of later stages depend on the earlier
    stages' box outputs).
    """

    @property
    def refines(self) -> bool:
        """Whether this RoI head's stages are run and decoded here (module doc)."""
        return type(self.model.roi_head).__name__ in REFINED_HEADS

    def forward(self, model: nn.Module, batch: dict) -> RawOutputs:
        """The box stages (:meth:`box_forward`), then the mask heads as mmdet's tensor-mode
        forward runs them on the last stage's RoIs, so that their layers are calibration
        units; their outputs are not returned (the decoding reads boxes only)."""
        if not self.refines:
            return super().forward(model, batch)
        roi_head = model.roi_head
        if type(roi_head).__name__ == 'SCNetRoIHead' and roi_head.with_mask:
            return self._scnet_forward(model, batch)
        raw, feats, extra = self._box_stages(model, batch)
        if getattr(roi_head, 'with_mask', False):
            if type(roi_head).__name__ == 'HybridTaskCascadeRoIHead':
                roi_head._mask_forward(stage=-1, x=feats, rois=raw.rois,
                                       semantic_feat=extra.get('semantic_feat'),
                                       training=False)
            else:
                for stage in range(roi_head.num_stages):
                    roi_head._mask_forward(stage, feats, raw.rois)
        return raw

    def _scnet_forward(self, model: nn.Module, batch: dict) -> RawOutputs:
        """SCNet: the box stages, then its mask branch as its tensor-mode ``forward`` runs
        it on the last stage's RoIs. That ``forward`` runs the last box head a second time
        on the same RoIs for the relayed feature; here the first run's feature is kept
        (equal values), so every box layer is called as often as in :meth:`box_forward`."""
        roi_head = model.roi_head
        shared: list = []
        handle = roi_head.bbox_head[-1].register_forward_hook(
            lambda _m, _a, out: shared.append(out[2]))
        try:
            raw, feats, extra = self._box_stages(model, batch)
        finally:
            handle.remove()
        relayed = shared[-1]
        if roi_head.with_feat_relay:
            relayed = roi_head.feat_relay_head(relayed)
        roi_head._mask_forward(feats, raw.rois, relayed_feat=relayed, **extra)
        return raw

    def box_forward(self, model: nn.Module, batch: dict) -> RawOutputs:
        """RPN outputs and the box stages only (module doc); a head this adapter does not
        refine runs whole (:meth:`forward`)."""
        if not self.refines:
            return self.forward(model, batch)
        return self._box_stages(model, batch)[0]

    def _box_stages(self, model: nn.Module, batch: dict) -> tuple[RawOutputs, tuple, dict]:
        feats, rpn_outs = self.features_and_rpn(model, batch)
        roi_head = model.roi_head
        extra = {}
        if getattr(roi_head, 'with_semantic', False):
            extra['semantic_feat'] = roi_head.semantic_head(feats)[1]
        if getattr(roi_head, 'with_glbctx', False):
            extra['glbctx_feat'] = roi_head.glbctx_head(feats)[1]
        proposals = batch['proposals']
        metas = [s.metainfo for s in batch['data_samples']]
        rois, cls_scores, bbox_preds = roi_head._refine_roi(
            feats, bbox2roi(proposals), metas, tuple(len(p) for p in proposals), **extra)
        if any(p is None for p in bbox_preds):
            raise NotImplementedError('a cascade stage without box regression')
        raw = RawOutputs((rpn_outs, (torch.cat(cls_scores), torch.cat(bbox_preds))),
                         image_shapes(batch['data_samples'], batch['inputs'].device),
                         torch.cat(rois))
        return raw, feats, extra

    def final_bbox_head(self) -> nn.Module:
        return self.model.roi_head.bbox_head[-1]

    def decode_stages(self, raw: RawOutputs) -> dict[str, list[DetPredictions]]:
        if not self.refines:
            raise NotImplementedError(
                f'{type(self.model.roi_head).__name__}: its stages need inputs this adapter '
                f'does not build (decoded: {", ".join(REFINED_HEADS)})')
        return super().decode_stages(raw)
