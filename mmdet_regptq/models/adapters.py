"""Detector adapters: the public entry point of ``mmdet_regptq.models``.

An adapter tells the model-agnostic engine how to run, read and decode one detector family
(see :mod:`mmdet_regptq.models.base` for the contract). Adapters are registered in
``DETECTOR_ADAPTERS`` under a detector class name and found through the detector's class
hierarchy, so a new detector that subclasses ``SingleStageDetector`` works without a new
adapter; dense heads whose decoding differs register a decoder by head class
(``DENSE_DECODERS``):

| family | registered as | module |
|---|---|---|
| one-stage dense heads (RetinaNet, FCOS, ATSS, GFL, YOLOF, RTMDet, YOLOX) | ``SingleStageDetector`` | ``dense.py`` |
| two-stage (Faster / Mask R-CNN) | ``TwoStageDetector`` | ``two_stage.py`` |
| cascade two-stage (Cascade R-CNN, HTC, DetectoRS) | ``CascadeRCNN`` | ``cascade.py`` |
| query-based (DETR family) | ``DetectionTransformer`` | ``detr.py`` |
| query-based two-stage (Sparse R-CNN, QueryInst) | ``SparseRCNN`` | ``query_two_stage.py`` |
| Ultralytics YOLOv5 (``mmdet_regptq.yolov5``) | ``YOLOv5Detector`` | ``yolov5.py`` |
"""
from __future__ import annotations

from typing import Any

from torch import nn

from mmdet_regptq.calib.fgic import DetPredictions
from mmdet_regptq.models.base import (DETECTOR_ADAPTERS, FINAL_LAYER_NAMES, DetectorAdapter,
                                      RawOutputs, final_layer_patterns)
from mmdet_regptq.models.cascade import CascadeAdapter
from mmdet_regptq.models.dense import DENSE_DECODERS, DenseHeadAdapter
from mmdet_regptq.models.detr import DETRAdapter
from mmdet_regptq.models.query_two_stage import QueryTwoStageAdapter
from mmdet_regptq.models.two_stage import TwoStageAdapter
from mmdet_regptq.models.yolov5 import YOLOv5Adapter

__all__ = ['DETECTOR_ADAPTERS', 'DENSE_DECODERS', 'FINAL_LAYER_NAMES', 'DetectorAdapter',
           'DenseHeadAdapter', 'TwoStageAdapter', 'CascadeAdapter', 'DETRAdapter',
           'QueryTwoStageAdapter', 'YOLOv5Adapter', 'DetPredictions', 'RawOutputs',
           'find_adapter', 'final_layer_patterns']


def find_adapter(model: nn.Module, **options: Any) -> DetectorAdapter:
    """The adapter registered for the nearest class in the detector's hierarchy.

    Args:
        model: the (unwrapped) detector.
        **options: keyword options of that adapter (e.g. ``max_proposals`` of
            :class:`TwoStageAdapter`).
    """
    for cls in type(model).__mro__:
        adapter_cls = DETECTOR_ADAPTERS.get(cls.__name__)
        if adapter_cls is not None:
            return adapter_cls(model, **options)
    return DetectorAdapter(model, **options)
