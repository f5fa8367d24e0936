"""Two-stage detectors (Faster R-CNN and the like) deployed as two static backend graphs.

One graph cannot hold a two-stage detector: the RPN's proposals come out of NMS, whose
count depends on the data. So the deployment is cut where mmdeploy's partitioned models
cut it, and the host runs mmdet's own code between the graphs:

1. graph ``<save_file>`` (:class:`RpnStage`): image → the neck's feature maps
   (``raw0_<level>``) and the RPN head's raw outputs (``raw1_<level>`` scores,
   ``raw2_<level>`` deltas);
2. host: ``rpn_head.predict_by_feat`` (anchors, decoding, NMS) → proposals;
   ``roi_head``'s RoI extractor (RoIAlign) → RoI features;
3. graph ``<save_file stem>_roi.onnx`` (:class:`RoIStage`): RoI features ``[num_rois, C,
   7, 7]`` (input ``roi_feats``; fewer RoIs are zero-padded, more run in chunks) → the box
   head's class scores (``raw0_0``) and deltas (``raw1_0``);
4. host: ``bbox_head.predict_by_feat`` (decoding, per-class NMS), through
   ``roi_head.predict`` with the box head's forward replaced by graph 2.

In the fake-quant model nothing between the neck and the box head is quantized (RoIAlign
takes the neck's float outputs; the first fc quantizes its own input inside graph 2), so
the split changes no value.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from mmdet_regptq.deploy.detectors.raw import flatten_outputs, unflatten_raw

__all__ = ['RpnStage', 'RoIStage', 'is_two_stage', 'roi_graph_file', 'num_rois_of',
           'TwoStageHost', 'ROI_INPUT', 'check_deployable', 'use_torchvision_roi_align']

ROI_INPUT = 'roi_feats'
RoIGraph = Callable[[Tensor], Sequence[Tensor]]


def is_two_stage(model_or_cfg: Any) -> bool:
    """Whether a detector (module or ``cfg.model``) has an RPN and a RoI head."""
    if isinstance(model_or_cfg, nn.Module):
        return hasattr(model_or_cfg, 'rpn_head') and hasattr(model_or_cfg, 'roi_head')
    return bool(model_or_cfg.get('rpn_head')) and bool(model_or_cfg.get('roi_head'))


def roi_graph_file(onnx_file: str | Path) -> str:
    """The RoI graph's file next to the first graph's: ``end2end.onnx`` → ``end2end_roi.onnx``."""
    path = Path(onnx_file)
    return str(path.with_name(f'{path.stem}_roi{path.suffix}'))


def num_rois_of(model_cfg: Any, requested: int = 0) -> int:
    """RoIs per graph-2 call: ``requested``, else the RPN's ``test_cfg.rpn.max_per_img``."""
    if requested:
        if requested < 1:
            raise ValueError(f'regptq.num_rois={requested}: allowed 0 (from the config) or >= 1')
        return int(requested)
    rpn_cfg = (model_cfg.model.get('test_cfg') or {}).get('rpn') or {}
    value = rpn_cfg.get('max_per_img')
    if not value:
        raise ValueError('model test_cfg.rpn.max_per_img is not set: give regptq.num_rois '
                         'in the deploy config')
    return int(value)


class RpnStage(nn.Module):
    """Graph 1: backbone + neck + RPN head; outputs ``(features, rpn scores, rpn deltas)``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if not is_two_stage(detector):
            raise TypeError(f'{type(detector).__name__} has no rpn_head + roi_head')
        self.detector = detector

    def structured(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``(features, rpn scores, rpn deltas)``, each per level (the graph's outputs
        before flattening)."""
        feats = self.detector.extract_feat(x)
        scores, deltas = self.detector.rpn_head(feats)
        return list(feats), list(scores), list(deltas)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(flatten_outputs(self.structured(x))[0])

    @torch.no_grad()
    def output_names(self, x: Tensor) -> list[str]:
        return flatten_outputs(self.structured(x))[1]


class RoIStage(nn.Module):
    """Graph 2: the RoI box head on RoI features; outputs ``(scores, deltas)``."""

    output_names = ['raw0_0', 'raw1_0']

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        check_deployable(detector)
        self.bbox_head = detector.roi_head.bbox_head

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        scores, deltas = self.bbox_head(roi_feats)
        return scores, deltas


def check_deployable(detector: nn.Module) -> None:
    """Raise unless the RoI head is one box head and no mask head (what graph 2 holds)."""
    roi_head = detector.roi_head
    if getattr(roi_head, 'with_mask', False):
        raise NotImplementedError(
            f'{type(detector).__name__}: its mask head is not deployed (graph 2 holds the '
            'box head only); for a box-only deployment remove mask_head / '
            'mask_roi_extractor from the model config')
    bbox_head = getattr(roi_head, 'bbox_head', None)
    if not isinstance(bbox_head, nn.Module) or isinstance(bbox_head, nn.ModuleList):
        raise NotImplementedError(
            f'{type(roi_head).__name__}: only a single box head deploys (cascade heads have '
            'a list of them)')


def run_in_chunks(graph: RoIGraph, roi_feats: Tensor, num_rois: int) -> tuple[Tensor, Tensor]:
    """Graph 2 on any number of RoIs: chunks of ``num_rois``, the last one zero-padded."""
    scores, deltas = [], []
    for start in range(0, roi_feats.shape[0], num_rois):
        chunk = roi_feats[start:start + num_rois]
        valid = chunk.shape[0]
        if valid < num_rois:
            chunk = torch.cat([chunk, chunk.new_zeros((num_rois - valid, *chunk.shape[1:]))])
        s, d = graph(chunk.contiguous())
        scores.append(s[:valid])
        deltas.append(d[:valid])
    return torch.cat(scores), torch.cat(deltas)


def use_torchvision_roi_align(extractor: nn.Module) -> int:
    """Switch the extractor's average-pooling mmcv ``RoIAlign`` layers to torchvision's
    kernel (torchvision has no max pooling); returns how many were switched."""
    from mmcv.ops import RoIAlign

    switched = 0
    for layer in extractor.modules():
        if isinstance(layer, RoIAlign) and layer.pool_mode == 'avg':
            layer.use_torchvision = True
            switched += 1
    return switched


class TwoStageHost:
    """mmdet's own host-side steps around the two graphs (module doc, steps 2 and 4).

    Args:
        detector: a detector of the model config (its weights are not used: only the RPN's
            prior generator / box coder / NMS settings, the RoI extractor and the box
            head's decoding run here).
        num_rois: the static RoI count of graph 2.
        torchvision_roi_align: pool with torchvision's RoIAlign kernel (mmcv's own
            ``use_torchvision`` switch) where the layer averages: the same values as mmcv's
            CPU kernel, 2-2.5x faster on one thread (the host's slowest step). The
            switch is made on ``detector``'s own layers.
    """

    def __init__(self, detector: nn.Module, num_rois: int, *,
                 torchvision_roi_align: bool = True) -> None:
        check_deployable(detector)
        self.detector = detector.eval()
        self.num_rois = num_rois
        if torchvision_roi_align:
            use_torchvision_roi_align(detector.roi_head.bbox_roi_extractor)

    def proposals(self, scores: Sequence[Tensor], deltas: Sequence[Tensor],
                  metas: Sequence[dict]) -> list:
        return self.detector.rpn_head.predict_by_feat(list(scores), list(deltas),
                                                      batch_img_metas=list(metas),
                                                      rescale=False)

    def roi_features(self, feats: Sequence[Tensor], proposals: list) -> Tensor:
        """RoIAlign features of the proposals, as ``roi_head._bbox_forward`` pools them."""
        from mmdet.structures.bbox import bbox2roi

        roi_head = self.detector.roi_head
        rois = bbox2roi([p.bboxes for p in proposals])
        extractor = roi_head.bbox_roi_extractor
        return extractor(tuple(feats)[:extractor.num_inputs], rois)

    @contextlib.contextmanager
    def _box_head_on(self, graph: RoIGraph) -> Iterator[None]:
        bbox_head = self.detector.roi_head.bbox_head
        bbox_head.forward = lambda x: run_in_chunks(graph, x, self.num_rois)
        try:
            yield
        finally:
            bbox_head.__dict__.pop('forward', None)

    @torch.no_grad()
    def predict(self, stage1_outputs: dict[str, Tensor], graph: RoIGraph,
                data_samples: list, rescale: bool = True) -> list:
        """Detections (``InstanceData`` per image) from graph 1's named outputs and graph 2."""
        feats, scores, deltas = unflatten_raw(stage1_outputs)
        metas = [s.metainfo for s in data_samples]
        proposals = self.proposals(scores, deltas, metas)
        with self._box_head_on(graph):
            return self.detector.roi_head.predict(tuple(feats), proposals, data_samples,
                                                  rescale=rescale)

    @torch.no_grad()
    def sample_roi_features(self, stage1: RpnStage, x: Tensor, metas: Sequence[dict]
                            ) -> Tensor:
        """``[num_rois, C, h, w]`` RoI features of image batch ``x`` (export / calibration
        input of graph 2), zero-padded or cut to ``num_rois``."""
        feats, scores, deltas = stage1.structured(x)
        roi_feats = self.roi_features(feats, self.proposals(scores, deltas, metas))
        roi_feats = roi_feats[:self.num_rois]
        pad = self.num_rois - roi_feats.shape[0]
        if pad:
            roi_feats = torch.cat([roi_feats, roi_feats.new_zeros((pad, *roi_feats.shape[1:]))])
        return roi_feats.contiguous()
