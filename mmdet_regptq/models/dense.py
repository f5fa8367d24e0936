"""One-stage dense heads: RetinaNet, FCOS, ATSS, GFL, YOLOF, RTMDet, YOLOX (and the RPN).

``bbox_head.forward(feats)`` returns per-level ``(cls_scores, bbox_preds[, score_factors])``;
decoding follows ``BaseDenseHead._predict_by_feat_single`` before NMS (every prior kept,
no score threshold). Heads whose decoding differs are registered in :data:`DENSE_DECODERS`
by head class name and found along the head's class hierarchy:

- ``BaseDenseHead`` (generic): priors from ``prior_generator.grid_priors`` (anchors
  ``[N, 4]`` or points ``[N, 2]``), ``bbox_coder.decode(priors, deltas, max_shape)``,
  sigmoid (or softmax with background) scores times the sigmoid of a third output with one
  channel per prior (FCOS / ATSS centerness). RetinaNet, FCOS (eval-mode distances already
  multiplied by the stride), ATSS, YOLOF, RTMDet (distances already times the stride).
- ``GFLHead``: ``bbox_pred`` is a distribution over ``0..reg_max``: its integral times the
  level's stride, decoded from the anchor centres.
- ``YOLOXHead``: its own ``_bbox_decode`` on ``(x, y, stride_w, stride_h)`` priors, scores
  ``sigmoid(cls) * sigmoid(objectness)``, boxes clipped to the image (our choice: YOLOX
  itself does not clip).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from mmengine.registry import Registry
from torch import Tensor, nn

from mmdet_regptq.calib.fgic import DetPredictions
from mmdet_regptq.models.base import (DETECTOR_ADAPTERS, DetectorAdapter, RawOutputs,
                                      clip_boxes, shape_list)

__all__ = ['DENSE_DECODERS', 'DenseHeadAdapter', 'DenseDecoder', 'decode_dense',
           'decode_gfl', 'decode_yolox', 'find_dense_decoder', 'flatten_levels']

#: ``decoder(head, outs, img_shapes) -> [DetPredictions per image]``
DenseDecoder = Callable[[nn.Module, Sequence, list[tuple[int, int]]], list[DetPredictions]]

DENSE_DECODERS = Registry('dense head decoder', scope='mmdet_regptq')


def flatten_levels(maps: Sequence[Tensor], channels: int) -> Tensor:
    """``[B, A*K, H, W]`` per level → ``[B, sum(H*W*A), K]`` (mmdet's prior order)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, channels) for m in maps],
                     dim=1)


def _grid_priors(head: nn.Module, maps: Sequence[Tensor], **kwargs) -> list[Tensor]:
    sizes = [m.shape[-2:] for m in maps]
    return head.prior_generator.grid_priors(sizes, dtype=maps[0].dtype, device=maps[0].device,
                                            **kwargs)


def _scores(head: nn.Module, logits: Tensor) -> tuple[Tensor, bool]:
    sigmoid = bool(getattr(head, 'use_sigmoid_cls', True))
    return (logits.sigmoid() if sigmoid else logits.softmax(-1)), sigmoid


@DENSE_DECODERS.register_module(name='BaseDenseHead')
def decode_dense(head: nn.Module, outs: Sequence, img_shapes: list[tuple[int, int]]
                 ) -> list[DetPredictions]:
    """Generic anchor / point head: see the module docstring.

    Args:
        head: the dense head (``prior_generator``, ``bbox_coder``, ``cls_out_channels``).
        outs: ``(cls_scores, bbox_preds[, score_factors])``, each a per-level list of
            ``[B, A*K, H, W]``.
        img_shapes: ``(h, w)`` per image.

    Returns:
        Per image: scores ``[N, C]``, boxes ``[N, 4]`` with ``N`` = number of priors.
    """
    cls_scores, bbox_preds = list(outs[0]), list(outs[1])
    priors = torch.cat(_grid_priors(head, cls_scores))
    scores, sigmoid = _scores(head, flatten_levels(cls_scores, head.cls_out_channels))
    factors = list(outs[2]) if len(outs) > 2 and outs[2] is not None else None
    if factors and sigmoid and factors[0].shape[1] == head.num_base_priors:  # centerness
        scores = scores * flatten_levels(factors, 1).sigmoid()
    deltas = flatten_levels(bbox_preds, head.bbox_coder.encode_size)
    return [DetPredictions(scores[i], head.bbox_coder.decode(priors, deltas[i], max_shape=shape),
                           shape, sigmoid) for i, shape in enumerate(img_shapes)]


@DENSE_DECODERS.register_module(name='GFLHead')
def decode_gfl(head: nn.Module, outs: Sequence, img_shapes: list[tuple[int, int]]
               ) -> list[DetPredictions]:
    """GFL: integral of the box distribution times the stride, from the anchor centres."""
    cls_scores, bbox_preds = list(outs[0]), list(outs[1])
    anchors = _grid_priors(head, cls_scores)
    project = head.integral.project                                      # [reg_max + 1]
    dists = []
    for pred, stride in zip(bbox_preds, head.prior_generator.strides):
        prob = flatten_levels([pred], 4 * (head.reg_max + 1))
        prob = prob.reshape(*prob.shape[:2], 4, head.reg_max + 1).softmax(-1)
        dists.append((prob @ project.to(prob)) * stride[0])              # [B, N_l, 4]
    dist = torch.cat(dists, dim=1)
    points = head.anchor_center(torch.cat(anchors))
    scores, sigmoid = _scores(head, flatten_levels(cls_scores, head.cls_out_channels))
    return [DetPredictions(scores[i], head.bbox_coder.decode(points, dist[i], max_shape=shape),
                           shape, sigmoid) for i, shape in enumerate(img_shapes)]


@DENSE_DECODERS.register_module(name='YOLOXHead')
def decode_yolox(head: nn.Module, outs: Sequence, img_shapes: list[tuple[int, int]]
                 ) -> list[DetPredictions]:
    """YOLOX: ``_bbox_decode`` on strided priors, ``sigmoid(cls) * sigmoid(obj)``."""
    cls_scores, bbox_preds, objectness = list(outs[0]), list(outs[1]), list(outs[2])
    priors = torch.cat(_grid_priors(head, cls_scores, with_stride=True))
    scores = flatten_levels(cls_scores, head.cls_out_channels).sigmoid()
    scores = scores * flatten_levels(objectness, 1).sigmoid()
    boxes = head._bbox_decode(priors, flatten_levels(bbox_preds, 4))    # [B, N, 4]
    return [DetPredictions(scores[i], clip_boxes(boxes[i], shape), shape, True)
            for i, shape in enumerate(img_shapes)]


@DENSE_DECODERS.register_module(name='YOLOV3Head')
def decode_yolov3(head: nn.Module, outs: Sequence, img_shapes: list[tuple[int, int]]
                  ) -> list[DetPredictions]:
    """YOLOv3: one map per level, ``[B, A * (5 + C), H, W]`` (xy offsets, wh, objectness,
    classes); boxes by the head's ``YOLOBBoxCoder`` with the level's stride after the
    sigmoid of the xy offsets, scores ``sigmoid(cls) * sigmoid(obj)`` (the score factor
    its ``predict_by_feat`` gives NMS)."""
    maps = list(outs[0])
    priors = torch.cat(_grid_priors(head, maps))
    preds = flatten_levels(maps, head.num_attrib)                        # [B, N, 5 + C]
    strides = torch.cat([preds.new_full((m.shape[-2] * m.shape[-1] * anchors,), float(s))
                         for m, s, anchors in zip(maps, head.featmap_strides,
                                                  head.prior_generator.num_base_priors)])
    deltas = torch.cat([preds[..., :2].sigmoid(), preds[..., 2:4]], dim=-1)
    boxes = head.bbox_coder.decode(priors, deltas, strides.unsqueeze(-1))
    scores = preds[..., 5:].sigmoid() * preds[..., 4:5].sigmoid()
    return [DetPredictions(scores[i], clip_boxes(boxes[i], shape), shape, True)
            for i, shape in enumerate(img_shapes)]


def find_dense_decoder(head: nn.Module) -> DenseDecoder:
    """The decoder registered for the nearest class in the head's hierarchy."""
    for cls in type(head).__mro__:
        decoder = DENSE_DECODERS.get(cls.__name__)
        if decoder is not None:
            return decoder
    raise KeyError(f'no dense decoder for {type(head).__name__}; registered: '
                   f'{sorted(DENSE_DECODERS.module_dict)}')


@DETECTOR_ADAPTERS.register_module(name='SingleStageDetector')
class DenseHeadAdapter(DetectorAdapter):
    """One-stage detectors: ``forward`` = ``model._forward`` (backbone, neck, head; no
    NMS); ``decode`` with the head's decoder from :data:`DENSE_DECODERS`.

    Head: ``bbox_head``; regression branch: its layers with ``reg`` / ``bbox_pred`` in the
    path (``reg_convs``, ``reg_subnet``, ``multi_level_reg_convs``, ``retina_reg``, ...).
    """

    head_scopes = ('bbox_head',)

    def logits(self, raw: RawOutputs) -> Tensor:
        head = self.model.bbox_head
        if hasattr(head, 'num_attrib'):    # YOLOv3: classes after box and objectness
            return flatten_levels(list(raw.outputs[0]), head.num_attrib)[..., 5:].flatten(0, 1)
        return flatten_levels(list(raw.outputs[0]), head.cls_out_channels).flatten(0, 1)

    def decode_stages(self, raw: RawOutputs) -> dict[str, list[DetPredictions]]:
        head = self.model.bbox_head
        return {'det': find_dense_decoder(head)(head, raw.outputs, shape_list(raw.img_shapes))}
