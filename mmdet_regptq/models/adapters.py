"""Detector adapters: what the quantization engine needs to know about an mmdet detector.

The engine in ``calib/`` is model-agnostic: it needs a function that runs the network on a
calibration batch without post-processing, the names of the final prediction layers
(kept FP by default, as in the paper), the scopes where residual blocks are reconstructed
block-wise, and - for PD-Quant's KL and Reg-PTQ's global loss - the head's outputs turned
into per-prediction class scores and decoded boxes with the head's OWN prior generator
and box coder. An adapter provides exactly that for one detector family; adapters are
found through the detector's class hierarchy (``DETECTOR_ADAPTERS``), so a new detector
that subclasses ``SingleStageDetector`` works without a new adapter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from mmengine.registry import Registry
from torch import Tensor, nn

DETECTOR_ADAPTERS = Registry('detector adapter', scope='mmdet_regptq')

#: Leaf names of the final prediction layers across mmdet's heads (kept FP by default).
FINAL_LAYER_NAMES = (
    'retina_cls', 'retina_reg', 'conv_cls', 'conv_reg', 'conv_centerness', 'conv_objectness',
    'conv_obj', 'atss_cls', 'atss_reg', 'atss_centerness', 'gfl_cls', 'gfl_reg', 'rpn_cls',
    'rpn_reg', 'fc_cls', 'fc_reg', 'conv_logits', 'rtm_cls', 'rtm_reg', 'rtm_obj',
    'multi_level_conv_cls', 'multi_level_conv_reg', 'multi_level_conv_obj', 'cls_score',
    'bbox_pred', 'object_pred', 'vfnet_cls', 'vfnet_reg', 'vfnet_reg_refine', 'fcos_cls',
    'fcos_reg', 'fcos_centerness', 'reppoints_cls_out', 'reppoints_pts_init_out',
    'reppoints_pts_refine_out', 'conv_seg', 'cls_branches', 'reg_branches', 'fc_mask_iou',
    'conv_kernel', 'conv_mask', 'heatmap_head', 'wh_head', 'offset_head', 'fc_centerness')


def final_layer_patterns(names: tuple[str, ...] = FINAL_LAYER_NAMES) -> list[str]:
    """Regexes matching the final prediction layers, including per-level ModuleLists.

    ``bbox_head.retina_cls`` and ``bbox_head.multi_level_conv_cls.0`` match; so does the
    last Linear of DETR's ``reg_branches`` style containers (``...reg_branches.5.4``).
    """
    alt = '|'.join(names)
    return [rf'(^|.*\.)({alt})(\.\d+)*$']


@dataclass
class DetPredictions:
    """Per-prediction outputs of one image, in the shape the global losses consume.

    Attributes:
        scores: class probabilities ``[N, C]`` (sigmoid or softmax, as the head uses).
        boxes: decoded boxes ``[N, 4]`` (x1, y1, x2, y2) in input-image pixels.
    """
    scores: Tensor
    boxes: Tensor


class DetectorAdapter:
    """Base adapter: generic parts shared by every detector family."""

    #: Prefixes (module paths) where residual blocks are calibrated block-wise.
    block_scopes: tuple[str, ...] = ('backbone',)
    #: Module paths that make up "the head" (Reg-PTQ's LLAQ targets).
    head_scopes: tuple[str, ...] = ('bbox_head',)

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- what to keep FP ------------------------------------------------------------
    def fp_layer_patterns(self) -> list[str]:
        """Regexes of the layers the default policy keeps in full precision."""
        return final_layer_patterns()

    def regression_layer_patterns(self) -> list[str]:
        """Regexes of the head's box-regression branch (LLAQ's default targets)."""
        scope = '|'.join(self.head_scopes)
        return [rf'^({scope})\..*(reg|bbox|box|offset|pts|wh)[^.]*(\..*)?$']

    def head_layer_patterns(self) -> list[str]:
        """Regexes of every layer of the detection head(s)."""
        return [rf'^{scope}\..*' for scope in self.head_scopes]

    # --- running the network ---------------------------------------------------------
    @torch.no_grad()
    def prepare_batch(self, data: dict) -> dict:
        """Run the data preprocessor once; calibration re-uses the tensors."""
        data = self.model.data_preprocessor(data, False)
        return {'inputs': data['inputs'], 'data_samples': data['data_samples']}

    def forward(self, model: nn.Module, batch: dict) -> Any:
        """Raw network outputs (no NMS) for a prepared batch."""
        return model._forward(batch['inputs'], batch['data_samples'])

    def logits(self, raw: Any) -> Tensor:
        """Classification logits ``[N, C]`` of every prediction (PD-Quant's KL)."""
        raise NotImplementedError(f'{type(self).__name__} has no logits()')

    def decode(self, raw: Any, batch: dict) -> list[DetPredictions]:
        """Per-image class scores and decoded boxes (Reg-PTQ's global loss)."""
        raise NotImplementedError(f'{type(self).__name__} has no decode()')

    @property
    def uses_sigmoid(self) -> bool:
        """Whether class scores are independent sigmoids (else a softmax with background)."""
        head = getattr(self.model, 'bbox_head', None)
        return bool(getattr(head, 'use_sigmoid_cls', True))


def _flatten_levels(maps: list[Tensor], channels: int) -> Tensor:
    """``[B, A*K, H, W]`` per level -> ``[B, sum(H*W*A), K]`` (mmdet's prior order)."""
    flat = [m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, channels) for m in maps]
    return torch.cat(flat, dim=1)


@DETECTOR_ADAPTERS.register_module(name='SingleStageDetector')
class DenseHeadAdapter(DetectorAdapter):
    """One-stage dense heads (RetinaNet, FCOS, ATSS, YOLOF, ...): ``bbox_head(x)`` returns
    per-level ``(cls_scores, bbox_preds, ...)`` decoded with the head's prior generator and
    ``bbox_coder`` exactly as ``BaseDenseHead._predict_by_feat_single`` does before NMS."""

    def logits(self, raw: Any) -> Tensor:
        head = self.model.bbox_head
        return _flatten_levels(list(raw[0]), head.cls_out_channels).flatten(0, 1)

    def decode(self, raw: Any, batch: dict) -> list[DetPredictions]:
        head = self.model.bbox_head
        cls_scores, bbox_preds = list(raw[0]), list(raw[1])
        sizes = [c.shape[-2:] for c in cls_scores]
        priors = head.prior_generator.grid_priors(
            sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device)
        priors = torch.cat(priors, dim=0)
        logits = _flatten_levels(cls_scores, head.cls_out_channels)
        box_dim = bbox_preds[0].shape[1] // (cls_scores[0].shape[1] // head.cls_out_channels)
        deltas = _flatten_levels(bbox_preds, box_dim)
        out = []
        for i, sample in enumerate(batch['data_samples']):
            scores = logits[i].sigmoid() if self.uses_sigmoid else logits[i].softmax(-1)
            boxes = head.bbox_coder.decode(priors[..., :4] if priors.shape[-1] == 4 else priors,
                                           deltas[i], max_shape=sample.img_shape)
            out.append(DetPredictions(scores, boxes))
        return out


def find_adapter(model: nn.Module) -> DetectorAdapter:
    """The adapter registered for the nearest class in the detector's hierarchy."""
    for cls in type(model).__mro__:
        adapter_cls = DETECTOR_ADAPTERS.get(cls.__name__)
        if adapter_cls is not None:
            return adapter_cls(model)
    return DetectorAdapter(model)
