"""Cascade RPN (``CascadeRPNHead``): its raw outputs and their decoding.

The head has no ``forward``: ``CascadeRPNHead.predict`` runs its stages in turn, each
stage's deltas refining the anchors the next one starts from (and, with
``adapt_cfg=dict(type='offset')``, giving its adaptive conv the offsets). The raw outputs
are therefore the last stage's ``(cls_scores, bbox_preds)`` *and* the refined anchors they
are relative to; :func:`decode_cascade_rpn` decodes them as the last stage's
``predict_by_feat`` does before NMS.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mmdet_regptq.calib.fgic import DetPredictions
from mmdet_regptq.models.dense import DENSE_DECODERS, flatten_levels

__all__ = ['is_cascade_rpn', 'cascade_rpn_forward', 'decode_cascade_rpn']


def is_cascade_rpn(head: nn.Module) -> bool:
    """Whether ``head`` is mmdet's ``CascadeRPNHead`` (stages, no ``forward``)."""
    from mmdet.models.dense_heads import CascadeRPNHead
    return isinstance(head, CascadeRPNHead)


def cascade_rpn_forward(head: nn.Module, feats: Sequence[Tensor], img_metas: list[dict]
                        ) -> tuple[list[Tensor], list[Tensor], tuple[Tensor, ...]]:
    """The stages as ``CascadeRPNHead.predict`` runs them, without the final decoding.

    Returns:
        ``(cls_scores, bbox_preds, anchors)``: the last stage's per-level ``[B, A, H, W]``
        scores and ``[B, 4A, H, W]`` deltas, and per level the refined anchors
        ``[B, H*W*A, 4]`` the deltas apply to.
    """
    sizes = [f.shape[-2:] for f in feats]
    anchor_list, _ = head.stages[0].get_anchors(sizes, img_metas, device=feats[0].device)
    x = feats
    for i, stage in enumerate(head.stages):
        offsets = (stage.anchor_offset(anchor_list, stage.anchor_strides, sizes)
                   if stage.adapt_cfg['type'] == 'offset' else None)
        x, cls_scores, bbox_preds = stage(x, offsets)
        if i < head.num_stages - 1:
            anchor_list = stage.refine_bboxes(anchor_list, bbox_preds, img_metas)
    anchors = tuple(torch.stack([per_image[level] for per_image in anchor_list])
                    for level in range(len(sizes)))
    return list(cls_scores), list(bbox_preds), anchors


@DENSE_DECODERS.register_module(name='CascadeRPNHead')
def decode_cascade_rpn(head: nn.Module, outs: Sequence, img_shapes: list[tuple[int, int]]
                       ) -> list[DetPredictions]:
    """Objectness and boxes of every refined anchor (:func:`cascade_rpn_forward`'s outputs),
    with the last stage's coder; sigmoid scores as the stage's ``use_sigmoid_cls``."""
    stage = head.stages[-1]
    cls_scores, bbox_preds, anchors = outs
    sigmoid = bool(getattr(stage, 'use_sigmoid_cls', True))
    logits = flatten_levels(list(cls_scores), stage.cls_out_channels)
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    deltas = flatten_levels(list(bbox_preds), stage.bbox_coder.encode_size)
    priors = torch.cat(list(anchors), dim=1)
    return [DetPredictions(scores[i], stage.bbox_coder.decode(priors[i], deltas[i],
                                                              max_shape=shape),
                           shape, sigmoid) for i, shape in enumerate(img_shapes)]
