"""The adapter contract: what the quantization engine needs to know about an mmdet detector.

The engine in ``calib/`` is model-agnostic: it needs a function that runs the network on a
calibration batch without post-processing, the names of the final prediction layers (kept
FP by default, as in the paper), the head and its regression branch (Reg-PTQ's LLAQ
targets), and - for PD-Quant's KL and Reg-PTQ's global loss - the head's outputs turned into
per-prediction class scores and decoded boxes with the head's OWN prior generator and box
coder. An adapter provides exactly that for one detector family.

Raw outputs: ``forward`` returns a :class:`RawOutputs` (a NamedTuple of the family's raw
head outputs, the image shapes as an int tensor and, for two-stage detectors, the RoIs), so
``decode_stages(raw)`` needs nothing but the raw outputs: that is what lets the global loss
be a plain ``global_loss(fp_raw, q_raw)`` callable (cached FP outputs included).
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Mapping, NamedTuple

import torch
from mmengine.registry import Registry
from torch import Tensor, nn

from mmdet_regptq.calib.fgic import DetPredictions, FGICConfig, FGICLoss
from mmdet_regptq.quant import eval_mode, iter_quant_modules

__all__ = ['DETECTOR_ADAPTERS', 'FINAL_LAYER_NAMES', 'DetectorAdapter', 'RawOutputs',
           'final_layer_patterns', 'branch_patterns', 'image_shapes', 'float_model',
           'clip_boxes']

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
    'conv_kernel', 'conv_mask', 'heatmap_head', 'wh_head', 'offset_head', 'fc_centerness',
    'convs_pred')


def final_layer_patterns(names: tuple[str, ...] = FINAL_LAYER_NAMES) -> list[str]:
    """Regexes matching the final prediction layers, including per-level ModuleLists.

    ``bbox_head.retina_cls`` and ``bbox_head.multi_level_conv_cls.0`` match; so does the
    last Linear of DETR's ``reg_branches`` style containers (``...reg_branches.5.4``).
    """
    alt = '|'.join(names)
    return [rf'(^|.*\.)({alt})(\.\d+)*$']


def branch_patterns(scope: str, components: str) -> str:
    """Regex of the layers under ``scope`` with a path component matching ``components``.

    ``branch_patterns('bbox_head', '[^.]*reg[^.]*')`` matches ``bbox_head.reg_convs.0.conv``
    and ``bbox_head.multi_level_reg_convs.1.0.conv`` but not ``bbox_head.cls_convs.0.conv``.
    """
    return rf'{re.escape(scope)}\.(.+\.)?({components})(\..+)?'


class RawOutputs(NamedTuple):
    """What ``adapter.forward`` returns.

    Attributes:
        outputs: the family's raw network outputs (dense: the head's tuple of per-level
            lists; two-stage: ``(rpn_outs, roi_outs)``; DETR: the head's per-layer tuple).
        img_shapes: ``[B, 2]`` int64 ``(h, w)`` of each image (after resize, before padding).
        rois: two-stage only: ``[R, 5]`` (batch index, x1, y1, x2, y2) of the fixed
            proposals the RoI head ran on.
    """

    outputs: Any
    img_shapes: Tensor
    rois: Tensor | None = None


def image_shapes(data_samples: list, device: torch.device | str = 'cpu') -> Tensor:
    """``[B, 2]`` int64 ``(h, w)`` of each sample's ``img_shape``."""
    return torch.tensor([list(s.img_shape[:2]) for s in data_samples], dtype=torch.long,
                        device=device)


def shape_list(img_shapes: Tensor) -> list[tuple[int, int]]:
    """``[B, 2]`` tensor → list of ``(h, w)`` ints."""
    return [(int(h), int(w)) for h, w in img_shapes.tolist()]


def clip_boxes(boxes: Tensor, img_shape: tuple[int, int]) -> Tensor:
    """Clamp ``[..., 4]`` x1y1x2y2 boxes to ``[0, w] x [0, h]`` (differentiable inside)."""
    h, w = img_shape
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)], -1)


@contextlib.contextmanager
def float_model(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no grad and every quantized wrapper switched off (restored afterwards)."""
    layers = [m for _, m in iter_quant_modules(model)]
    saved = [(m.quant_weight, m.quant_input) for m in layers]
    try:
        for m in layers:
            m.set_quant(weight=False, input=False)
        with eval_mode(model), torch.no_grad():
            yield model
    finally:
        for m, (w, a) in zip(layers, saved):
            m.set_quant(weight=w, input=a)


class DetectorAdapter:
    """Base adapter: the generic parts; families override forward / decode / patterns.

    Args:
        model: the (unwrapped) mmdet detector.
    """

    #: Prefixes (module paths) where residual blocks are calibrated block-wise.
    block_scopes: tuple[str, ...] = ('backbone',)
    #: Module paths that make up "the head" (LLAQ's targets with ``llaq='head'``).
    head_scopes: tuple[str, ...] = ('bbox_head',)
    #: Stage of :meth:`decode_stages` returned by :meth:`decode` (the final predictions).
    final_stage: str = 'det'

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- which layers ----------------------------------------------------------------
    def fp_layer_patterns(self) -> list[str]:
        """Regexes of the layers the default policy keeps in full precision."""
        return final_layer_patterns()

    def head_layer_patterns(self) -> list[str]:
        """Regexes (``re.fullmatch``) of every layer of the detection head(s)."""
        return [rf'{re.escape(scope)}\..+' for scope in self.head_scopes]

    def regression_layer_patterns(self) -> list[str]:
        """Regexes of the head's box-regression branch (LLAQ's default targets): the
        layers of the head with a path component containing ``reg`` or ``bbox_pred``."""
        return [branch_patterns(scope, r'[^.]*(reg|bbox_pred)[^.]*')
                for scope in self.head_scopes]

    # --- running the network ---------------------------------------------------------
    @torch.no_grad()
    def prepare_batch(self, data: dict) -> dict:
        """Run the data preprocessor once; calibration re-uses the tensors."""
        data = self.model.data_preprocessor(data, False)
        return {'inputs': data['inputs'], 'data_samples': data['data_samples']}

    def forward(self, model: nn.Module, batch: dict) -> RawOutputs:
        """Raw network outputs (no NMS) for a prepared batch."""
        outputs = model._forward(batch['inputs'], batch['data_samples'])
        return RawOutputs(outputs, image_shapes(batch['data_samples'], batch['inputs'].device))

    def box_forward(self, model: nn.Module, batch: dict) -> RawOutputs:
        """The part of :meth:`forward` that :meth:`decode_stages` reads.

        Reg-PTQ's global loss runs the network after every unit at every iteration; a
        family whose forward also computes outputs the decoding never reads (Mask R-CNN's
        mask head) overrides this to leave them out. Default: :meth:`forward`.
        """
        return self.forward(model, batch)

    def logits(self, raw: RawOutputs) -> Tensor:
        """Classification logits ``[N, C]`` of every prediction (PD-Quant's KL)."""
        raise NotImplementedError(f'{type(self).__name__} has no logits()')

    def decode_stages(self, raw: RawOutputs) -> dict[str, list[DetPredictions]]:
        """Per stage, per image: class scores and decoded boxes (Reg-PTQ's global loss)."""
        raise NotImplementedError(f'{type(self).__name__} has no decode()')

    def decode(self, raw: RawOutputs, batch: dict | None = None) -> list[DetPredictions]:
        """Per-image predictions of the final stage (``batch`` is not needed: kept for
        callers of the first version of this API)."""
        return self.decode_stages(raw)[self.final_stage]

    def global_loss(self, cfg: FGICConfig | Mapping[str, Any] | None = None) -> FGICLoss:
        """Reg-PTQ's ``global_loss(fp_raw, q_raw) -> scalar`` (FGIC over every stage)."""
        return FGICLoss(self.decode_stages, cfg)

    @property
    def uses_sigmoid(self) -> bool:
        """Whether class scores are independent sigmoids (else a softmax with background)."""
        head = getattr(self.model, 'bbox_head', None)
        return bool(getattr(head, 'use_sigmoid_cls', True))
