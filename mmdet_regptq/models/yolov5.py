"""YOLOv5 (``mmdet_regptq.yolov5``): decoding for the global loss, and the LLAQ targets.

Boxes and scores come from the head's own ``decode_maps`` (its prior generator and box
coder): scores ``sigmoid(obj) * sigmoid(cls)`` per class, boxes clipped to the image (our
choice, as for YOLOX: Ultralytics clips only after NMS).

YOLOv5's head is coupled: one 1x1 prediction conv per level (``bbox_head.convs_pred``,
kept FP by the default policy) computes boxes, objectness and classes from the PAN
outputs, so there is no separate regression branch. The "head" whose layers Reg-PTQ
targets is the last C3 of each PAN output (``neck.out_p3/p4/p5``); LLAQ's default targets
(``llaq='reg'``) are the convs that produce the three maps the prediction convs read
(``neck.out_p*.final_conv``).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from mmdet_regptq.calib.fgic import DetPredictions
from mmdet_regptq.models.base import DETECTOR_ADAPTERS, clip_boxes
from mmdet_regptq.models.dense import DENSE_DECODERS, DenseHeadAdapter

__all__ = ['YOLOv5Adapter', 'decode_yolov5']

_OUTPUT_C3 = r'neck\.out_p[345]'


@DENSE_DECODERS.register_module(name='YOLOv5Head')
def decode_yolov5(head: nn.Module, outs: Sequence, img_shapes: list[tuple[int, int]]
                  ) -> list[DetPredictions]:
    """Per image: scores ``[N, C]`` (objectness x class) and x1y1x2y2 boxes ``[N, 4]``.

    Args:
        head: a ``YOLOv5Head``.
        outs: its forward output ``(pred_maps,)``, per level ``[B, A * (5 + C), H, W]``.
        img_shapes: ``(h, w)`` per image (the letterboxed canvas).
    """
    boxes, obj, cls = head.decode_maps(list(outs[0]))
    scores = obj.unsqueeze(-1) * cls
    return [DetPredictions(scores[i], clip_boxes(boxes[i], shape), shape, True)
            for i, shape in enumerate(img_shapes)]


@DETECTOR_ADAPTERS.register_module(name='YOLOv5Detector')
class YOLOv5Adapter(DenseHeadAdapter):
    """``YOLOv5Detector``: the dense-head path with YOLOv5's decoder; head = the three
    output C3 layers of the PAN, regression branch = their last convs (see module doc)."""

    def head_layer_patterns(self) -> list[str]:
        return [rf'{_OUTPUT_C3}\..+', r'bbox_head\..+']

    def regression_layer_patterns(self) -> list[str]:
        return [rf'{_OUTPUT_C3}\.final_conv\.conv']
