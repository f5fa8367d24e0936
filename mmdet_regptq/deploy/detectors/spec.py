"""``spec.json`` of a deployed work dir: what the torch-free runtime needs besides the
backend file(s) — preprocessing (from the model config's test pipeline and data
preprocessor), class names, and for a graph that stops at the raw head outputs the dense
head's post-processing settings (its priors go to ``priors.npz``); for a two-stage detector
on TVM those of the NumPy RPN / RoIAlign / box-head steps between and after its two graphs
(the RPN's anchors go to ``priors.npz``)."""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

__all__ = ['preprocess_spec', 'dense_postprocess_spec', 'yolov5_postprocess_spec',
           'two_stage_postprocess_spec', 'postprocess_spec', 'write_spec', 'SPEC_FILE',
           'PRIORS_FILE']

SPEC_FILE = 'spec.json'
PRIORS_FILE = 'priors.npz'


RESIZES = ('Resize', 'mmdet.Resize')
LETTERBOXES = ('YOLOv5Letterbox', 'mmdet.YOLOv5Letterbox')


def _normalize_spec(model_cfg: Any, input_shape: Sequence[int]) -> dict:
    pre = model_cfg.model.data_preprocessor
    return dict(mean=list(pre.get('mean', [0, 0, 0])), std=list(pre.get('std', [1, 1, 1])),
                bgr_to_rgb=bool(pre.get('bgr_to_rgb', pre.get('rgb_to_bgr', False))),
                input_shape=[int(v) for v in input_shape])


def preprocess_spec(model_cfg: Any, input_shape: Sequence[int]) -> dict:
    """The test pipeline's ``Resize`` (or ``YOLOv5Letterbox``) + ``data_preprocessor`` →
    the runtime's keys (``runtime/preprocess.py``).

    A letterbox pads, centred, to the graph's static ``input_shape`` (the pipeline's
    ``size_divisor`` is for the dynamic-shape test run; the graph takes one shape), so its
    long side ``scale`` must fit the shorter side of ``input_shape``.
    """
    pipeline = model_cfg.get('test_pipeline') or model_cfg.test_dataloader.dataset.pipeline
    resize = [t for t in pipeline if t.get('type') in RESIZES + LETTERBOXES]
    if len(resize) != 1 or ('scale' not in resize[0]
                            and resize[0]['type'] not in LETTERBOXES):
        raise ValueError('the test pipeline needs exactly one Resize with a scale or one '
                         f'YOLOv5Letterbox for the runtime, found {resize}')
    step = resize[0]
    if step['type'] in LETTERBOXES:
        scale = int(step.get('scale', 640))
        if scale > min(int(v) for v in input_shape):
            raise ValueError(f'YOLOv5Letterbox scale={scale} does not fit the static input '
                             f'shape (h, w)={tuple(input_shape)}: set onnx_config.input_shape '
                             f'to at least [{scale}, {scale}]')
        return dict(type='letterbox', scale=scale, pad_val=int(step.get('pad_val', 114)),
                    allow_upscale=bool(step.get('allow_upscale', True)),
                    interpolation=str(step.get('interpolation', 'bilinear')),
                    **_normalize_spec(model_cfg, input_shape))
    scale = step['scale']
    scale = [scale, scale] if isinstance(scale, int) else list(scale)
    return dict(type='resize', scale=scale, keep_ratio=bool(step.get('keep_ratio', False)),
                **_normalize_spec(model_cfg, input_shape))


def static_letterbox(model_cfg: Any, input_shape: Sequence[int]) -> Any:
    """A copy of ``model_cfg`` whose ``YOLOv5Letterbox`` pads to the square static
    ``input_shape`` (``size_divisor`` = its side), so the export image and the ORT INT8
    calibration images are letterboxed as the runtime does it (MMDeploy's static export of
    a letterbox: padded to the input shape, centred). Other configs come back unchanged."""
    h, w = (int(v) for v in input_shape)
    pipelines = [model_cfg.get('test_pipeline'),
                 model_cfg.get('test_dataloader', {}).get('dataset', {}).get('pipeline')]
    if h != w or not any(t.get('type') in LETTERBOXES for p in pipelines if p for t in p):
        return model_cfg
    cfg = copy.deepcopy(model_cfg)   # Config.copy() shares the nested pipelines
    for key in ('test_pipeline', 'test_dataloader.dataset.pipeline'):
        node = cfg
        for part in key.split('.'):
            node = node.get(part) if node is not None else None
        for t in node or []:
            if t.get('type') in LETTERBOXES:
                t['size_divisor'] = h
    return cfg


def _coder_spec(coder: Any) -> dict:
    """A box coder's settings for ``runtime/postprocess.decode``."""
    spec = dict(type=type(coder).__name__, clip_border=bool(coder.clip_border))
    if spec['type'] == 'DeltaXYWHBBoxCoder':
        spec.update(means=list(coder.means), stds=list(coder.stds),
                    add_ctr_clamp=bool(coder.add_ctr_clamp),
                    ctr_clamp=float(coder.ctr_clamp), wh_ratio_clip=16 / 1000)
    return spec


def _nms_test_cfg(test_cfg: Any, keys: Sequence[str]) -> dict:
    """The ``keys`` a head's ``test_cfg`` sets, plus its NMS IoU threshold."""
    out = {k: test_cfg[k] for k in keys if k in test_cfg}
    out['nms'] = dict(iou_threshold=float(test_cfg['nms']['iou_threshold']))
    return out


def dense_postprocess_spec(detector: nn.Module, input_shape: Sequence[int]
                           ) -> tuple[dict, list[np.ndarray]]:
    """Post-processing settings and priors of a dense head for ``DensePostProcessor``."""
    from mmdet_regptq.deploy.detectors.end2end import DenseEnd2End

    graph = DenseEnd2End(detector, input_shape)     # checks the head, makes the priors
    head = detector.bbox_head
    coder = head.bbox_coder
    coder_spec = _coder_spec(coder)
    cfg = _nms_test_cfg(head.test_cfg, ('nms_pre', 'score_thr', 'min_bbox_size',
                                        'max_per_img'))
    spec = dict(kind='dense', num_classes=int(head.num_classes),
                cls_out_channels=int(head.cls_out_channels),
                use_sigmoid=bool(head.use_sigmoid_cls),
                encode_size=int(coder.encode_size), coder=coder_spec,
                score_factors=graph.with_score_factors, test_cfg=cfg,
                input_shape=[int(v) for v in input_shape])
    priors = [getattr(graph, f'priors{i}').numpy() for i in range(graph.num_levels)]
    return spec, priors


def yolov5_postprocess_spec(detector: nn.Module, input_shape: Sequence[int]
                            ) -> tuple[dict, list[np.ndarray]]:
    """Post-processing settings and priors of a ``YOLOv5Head`` for ``YOLOv5PostProcessor``
    (the priors and strides of ``YOLOv5End2End`` for this static input shape)."""
    from mmdet_regptq.deploy.detectors.yolov5_graph import YOLOv5End2End

    graph = YOLOv5End2End(detector, input_shape)
    head = detector.bbox_head
    priors = np.split(graph.priors.numpy(), np.cumsum(graph.level_priors)[:-1])
    cfg = {k: graph.cfg[k] for k in ('score_thr', 'nms_pre', 'max_per_img')}
    cfg.update(multi_label=bool(graph.cfg.get('multi_label', True)),
               nms=dict(iou_threshold=float(graph.cfg['nms']['iou_threshold'])))
    spec = dict(kind='yolov5', num_classes=int(head.num_classes),
                strides=[int(s) for s in head.strides], test_cfg=cfg,
                input_shape=[int(v) for v in input_shape])
    return spec, priors


def two_stage_postprocess_spec(detector: nn.Module, input_shape: Sequence[int],
                               num_rois: int) -> tuple[dict, list[np.ndarray]]:
    """Settings of ``TwoStagePostProcessor`` (RPN proposals, RoIAlign, the box head's
    decoding and NMS) and the RPN's anchors of a Faster R-CNN-like detector, for graph 2
    on ``num_rois`` RoIs per call."""
    import torch

    from mmdet_regptq.deploy.detectors.two_stage import ROI_INPUT, check_deployable

    check_deployable(detector)
    rpn, roi_head = detector.rpn_head, detector.roi_head
    extractor, bbox_head = roi_head.bbox_roi_extractor, roi_head.bbox_head
    layer = extractor.roi_layers[0]
    if getattr(layer, 'pool_mode', 'avg') != 'avg' or type(layer).__name__ != 'RoIAlign':
        raise NotImplementedError(f'{type(layer).__name__} (pool_mode='
                                  f'{getattr(layer, "pool_mode", None)!r}): the NumPy RoI '
                                  'extractor has RoIAlign with average pooling only')
    if getattr(bbox_head, 'with_cls', True) is False or \
            getattr(bbox_head, 'custom_activation', False):
        raise NotImplementedError(f'{type(bbox_head).__name__}: the NumPy box decoding '
                                  'needs softmax class scores')
    if type(bbox_head.bbox_coder).__name__ != 'DeltaXYWHBBoxCoder' or \
            type(rpn.bbox_coder).__name__ != 'DeltaXYWHBBoxCoder':
        raise NotImplementedError('the NumPy two-stage post-processor decodes with '
                                  'DeltaXYWHBBoxCoder only')
    with torch.no_grad():
        feats = detector.extract_feat(torch.zeros(1, 3, *(int(v) for v in input_shape)))
        scores, _ = rpn(feats)
    priors = rpn.prior_generator.grid_priors([s.shape[-2:] for s in scores],
                                             dtype=torch.float32, device='cpu')

    spec = dict(
        kind='two_stage', input_shape=[int(v) for v in input_shape],
        num_rois=int(num_rois), roi_input=ROI_INPUT,
        rpn=dict(cls_out_channels=int(rpn.cls_out_channels),
                 use_sigmoid=bool(rpn.use_sigmoid_cls),
                 encode_size=int(rpn.bbox_coder.encode_size),
                 coder=_coder_spec(rpn.bbox_coder),
                 test_cfg=_nms_test_cfg(rpn.test_cfg, ('nms_pre', 'max_per_img',
                                                       'min_bbox_size'))),
        roi=dict(strides=[int(s) for s in extractor.featmap_strides],
                 output_size=[int(v) for v in layer.output_size],
                 sampling_ratio=int(layer.sampling_ratio), aligned=bool(layer.aligned),
                 finest_scale=float(extractor.finest_scale)),
        rcnn=dict(num_classes=int(bbox_head.num_classes),
                  reg_class_agnostic=bool(bbox_head.reg_class_agnostic),
                  encode_size=int(bbox_head.bbox_coder.encode_size),
                  coder=_coder_spec(bbox_head.bbox_coder),
                  test_cfg=_nms_test_cfg(roi_head.test_cfg,
                                         ('score_thr', 'max_per_img'))))
    return spec, [p.numpy() for p in priors]


def postprocess_spec(detector: nn.Module, input_shape: Sequence[int]
                     ) -> tuple[dict, list[np.ndarray]]:
    """The NumPy post-processor's settings and priors of a single-stage detector."""
    from mmdet_regptq.deploy.detectors.yolov5_graph import is_yolov5

    if is_yolov5(detector):
        return yolov5_postprocess_spec(detector, input_shape)
    return dense_postprocess_spec(detector, input_shape)


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_spec(work_dir: str | Path, spec: dict, priors: Sequence[np.ndarray] | None = None
               ) -> list[str]:
    """Write ``spec.json`` (and ``priors.npz``) atomically; returns the paths."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    files = [work_dir / SPEC_FILE]
    _atomic_write(files[0], lambda p: Path(p).write_text(json.dumps(spec, indent=1)))
    if priors is not None:
        files.append(work_dir / PRIORS_FILE)

        def save(p: str) -> None:
            with open(p, 'wb') as f:
                np.savez(f, **{f'priors{i}': a for i, a in enumerate(priors)})
        _atomic_write(files[1], save)
    return [str(f) for f in files]

