"""``YOLOv5Head``: YOLOv5's anchor head with its own decoding and validation NMS.

Per level a 1x1 conv predicts ``A * (5 + C)`` channels (anchor-major: ``tx, ty, tw, th,
objectness, classes``). With ``s = sigmoid(t)``, the prior's centre ``c = (i + 0.5) * stride``
(mmdet's ``YOLOAnchorGenerator``) and its size ``(w_a, h_a)`` in pixels:
``xy = c + (2 s_xy - 1) * stride`` (= ``(2 s_xy - 0.5 + i) * stride``) and
``wh = (2 s_wh)^2 * (w_a, h_a)``; the score of class ``k`` is ``s_obj * s_k``.
Post-processing follows Ultralytics' validation: every (box, class) pair with score above
``score_thr`` (multi-label), the ``nms_pre`` best, class-wise NMS, ``max_per_img`` kept.
"""
from __future__ import annotations

from typing import Sequence

import torch
from mmcv.ops import batched_nms
from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
from mmdet.registry import MODELS, TASK_UTILS
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData
from torch import Tensor, nn

from mmdet_regptq.yolov5.layers import make_divisible

__all__ = ['YOLOv5BBoxCoder', 'YOLOv5Head']

#: COCO anchors of the P5 models (pixels), per level.
DEFAULT_ANCHORS = [[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)],
                   [(116, 90), (156, 198), (373, 326)]]


@TASK_UTILS.register_module()
class YOLOv5BBoxCoder:
    """YOLOv5 box decoding (decoding only: the head is converted, not trained here)."""

    encode_size = 4

    def encode(self, *args, **kwargs) -> Tensor:
        raise NotImplementedError('YOLOv5BBoxCoder decodes only (training is not supported)')

    def decode(self, priors: Tensor, pred: Tensor, stride: Tensor) -> Tensor:
        """Decoded boxes.

        Args:
            priors: ``[N, 4]`` x1y1x2y2 anchors centred on the grid cells.
            pred: ``[..., N, 4]`` sigmoid of ``(tx, ty, tw, th)``.
            stride: ``[N]`` stride of each prior.

        Returns:
            ``[..., N, 4]`` x1y1x2y2 boxes in input-image pixels.
        """
        centre = (priors[:, :2] + priors[:, 2:]) * 0.5
        size = priors[:, 2:] - priors[:, :2]
        xy = centre + (pred[..., :2] * 2 - 1) * stride.unsqueeze(-1)
        wh = (pred[..., 2:4] * 2) ** 2 * size
        return torch.cat((xy - wh * 0.5, xy + wh * 0.5), dim=-1)


@MODELS.register_module()
class YOLOv5Head(BaseDenseHead):
    """Coupled YOLOv5 head (``Detect``): one 1x1 prediction conv per level.

    Args:
        num_classes: classes (80 on COCO).
        in_channels: input channels per level at width 1 (scaled by ``widen_factor``).
        widen_factor: the yaml's ``width_multiple``.
        prior_generator: anchors, default mmdet's ``YOLOAnchorGenerator`` with the COCO
            anchors at strides 8, 16, 32.
        bbox_coder: box decoding (``YOLOv5BBoxCoder``).
        train_cfg: unused (inference only).
        test_cfg: ``score_thr`` (0.001), ``nms`` (IoU 0.65), ``max_per_img`` (300),
            ``nms_pre`` (30000), ``multi_label`` (True).
        init_cfg: mmengine init config.
    """

    def __init__(self, num_classes: int = 80, in_channels: Sequence[int] = (256, 512, 1024),
                 widen_factor: float = 1.0, prior_generator: dict | None = None,
                 bbox_coder: dict | None = None, train_cfg: dict | None = None,
                 test_cfg: dict | None = None, init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        if num_classes < 1:
            raise ValueError(f'num_classes={num_classes} must be >= 1')
        self.num_classes = num_classes
        self.num_attrib = 5 + num_classes
        self.prior_generator = TASK_UTILS.build(prior_generator or dict(
            type='YOLOAnchorGenerator', base_sizes=DEFAULT_ANCHORS, strides=[8, 16, 32]))
        self.bbox_coder = TASK_UTILS.build(bbox_coder or dict(type='YOLOv5BBoxCoder'))
        self.num_base_priors = self.prior_generator.num_base_priors[0]
        self.strides = [s[0] if isinstance(s, (tuple, list)) else s
                        for s in self.prior_generator.strides]
        # anchor sizes in pixels [levels, anchors, 2]: saved with the weights so that a
        # checkpoint with other anchors (autoanchor) is refused instead of mis-decoded
        self.register_buffer('anchors', torch.tensor(
            [[list(size) for size in level] for level in self.prior_generator.base_sizes],
            dtype=torch.float32))
        channels = [make_divisible(c * widen_factor) for c in in_channels]
        if len(channels) != self.prior_generator.num_levels:
            raise ValueError(f'in_channels has {len(channels)} levels but the prior generator '
                             f'{self.prior_generator.num_levels}')
        self.convs_pred = nn.ModuleList(
            nn.Conv2d(c, self.num_base_priors * self.num_attrib, 1) for c in channels)
        self.train_cfg = train_cfg
        defaults = dict(score_thr=0.001, nms=dict(type='nms', iou_threshold=0.65),
                        max_per_img=300, nms_pre=30000, multi_label=True)
        self.test_cfg = ConfigDict({**defaults, **dict(test_cfg or {})})

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor]]:
        """Raw maps ``[B, A * (5 + C), H, W]`` per level, as a one-element tuple."""
        return ([conv(x) for conv, x in zip(self.convs_pred, feats)],)

    def decode_maps(self, pred_maps: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes, objectness and class probabilities of every prior.

        Args:
            pred_maps: per level ``[B, A * (5 + C), H, W]``.

        Returns:
            boxes ``[B, N, 4]`` (x1y1x2y2, network-input pixels), objectness ``[B, N]``,
            class probabilities ``[B, N, C]``; priors in mmdet's order (level, y, x, anchor).
        """
        sizes = [m.shape[-2:] for m in pred_maps]
        priors = self.prior_generator.grid_priors(sizes, dtype=pred_maps[0].dtype,
                                                  device=pred_maps[0].device)
        strides = torch.cat([p.new_full((p.shape[0],), float(s))
                             for p, s in zip(priors, self.strides)])
        preds = torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, self.num_attrib)
                           for m in pred_maps], dim=1).sigmoid()
        boxes = self.bbox_coder.decode(torch.cat(priors), preds[..., :4], strides)
        return boxes, preds[..., 4], preds[..., 5:]

    def predict_by_feat(self, pred_maps: Sequence[Tensor], batch_img_metas: list[dict],
                        cfg: dict | None = None, rescale: bool = False,
                        with_nms: bool = True) -> list[InstanceData]:
        """Detections per image (boxes in original-image pixels when ``rescale``)."""
        cfg = self.test_cfg if cfg is None else cfg
        boxes, obj, cls = self.decode_maps(pred_maps)
        results = []
        for i, meta in enumerate(batch_img_metas):
            results.append(self._predict_single(boxes[i], obj[i, :, None] * cls[i], meta, cfg,
                                                rescale, with_nms))
        return results

    def _predict_single(self, boxes: Tensor, scores: Tensor, meta: dict, cfg: dict,
                        rescale: bool, with_nms: bool) -> InstanceData:
        if cfg.get('multi_label', True):
            idx, labels = (scores > cfg['score_thr']).nonzero(as_tuple=True)
            boxes, scores = boxes[idx], scores[idx, labels]
        else:
            scores, labels = scores.max(dim=1)
            keep = scores > cfg['score_thr']
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if scores.numel() > cfg['nms_pre']:
            top = scores.topk(cfg['nms_pre']).indices
            boxes, scores, labels = boxes[top], scores[top], labels[top]
        if with_nms and scores.numel():
            _, keep = batched_nms(boxes, scores, labels, dict(cfg['nms']))
            keep = keep[:cfg['max_per_img']]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if rescale:
            boxes = self._to_original(boxes, meta)
        result = InstanceData()
        result.bboxes, result.scores, result.labels = boxes, scores, labels
        return result

    @staticmethod
    def _to_original(boxes: Tensor, meta: dict) -> Tensor:
        """Undo the letterbox: minus the padding, divided by the scale, clipped."""
        pad = meta.get('pad_param')
        if pad is not None:   # [top, bottom, left, right]
            boxes = boxes - boxes.new_tensor([pad[2], pad[0], pad[2], pad[0]])
        scale = boxes.new_tensor(meta['scale_factor']).repeat(2)
        boxes = boxes / scale
        h, w = meta['ori_shape'][:2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        return boxes

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        theirs = state_dict.get(f'{prefix}anchors')
        if theirs is not None and (theirs.shape != self.anchors.shape or not torch.allclose(
                theirs.float(), self.anchors, atol=1e-3)):
            sizes = [[tuple(round(v, 3) for v in a) for a in level] for level in theirs.tolist()]
            raise ValueError(
                f'YOLOv5 checkpoint anchors {sizes} differ from the config\'s '
                f'{self.prior_generator.base_sizes}; set '
                f'model.bbox_head.prior_generator.base_sizes={sizes} in the config')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def loss_by_feat(self, *args, **kwargs) -> dict:
        raise NotImplementedError('YOLOv5Head is converted from Ultralytics weights for '
                                  'inference and post-training quantization; training is '
                                  'not supported')
