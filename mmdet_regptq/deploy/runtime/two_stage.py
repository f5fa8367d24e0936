"""A two-stage detector (Faster R-CNN) end to end without torch: graph 1 (image → neck
features ``raw0_<level>``, RPN scores ``raw1_<level>``, RPN deltas ``raw2_<level>``), then in
NumPy the RPN's proposals, RoIAlign, graph 2 (RoI features → class scores ``raw0_0`` and
deltas ``raw1_0`` on a static RoI count) and the RoI head's decoding + NMS.

The NumPy steps are mmdet 3.3's (``RPNHead._predict_by_feat_single`` +
``_bbox_post_process``, ``SingleRoIExtractor.forward`` with mmcv's ``RoIAlign``,
``BBoxHead._predict_by_feat_single`` + ``multiclass_nms``), configured by
``spec['postprocess']`` (``kind='two_stage'``, written by ``detectors/spec.py``), with the
RPN's anchors from ``priors.npz``. Boxes are clipped to the graph's static input shape, as
in the ONNX end-to-end graph (``detectors/two_stage_graph.py``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mmdet_regptq.deploy.runtime.postprocess import (_F32, _sigmoid, _softmax, _top_k,
                                                     batched_nms, decode, nms_detections,
                                                     size_mask)
from mmdet_regptq.deploy.runtime.roi_align import extract_roi_features

__all__ = ['TwoStagePostProcessor', 'TwoStagePipeline']

#: a graph as the runtime calls it: named inputs → named outputs
Graph = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class TwoStagePostProcessor:
    """The NumPy steps between and after the two graphs (module doc).

    Args:
        spec: ``spec['postprocess']`` with ``kind='two_stage'``.
        priors: per level ``[H * W * A, 4]`` RPN anchors.
    """

    def __init__(self, spec: Mapping[str, Any], priors: Sequence[np.ndarray]) -> None:
        if spec.get('kind') != 'two_stage':
            raise ValueError(f"postprocess.kind {spec.get('kind')!r}: expected 'two_stage'")
        self.spec = spec
        self.rpn, self.roi, self.rcnn = spec['rpn'], spec['roi'], spec['rcnn']
        self.input_shape = [int(v) for v in spec['input_shape']]
        self.priors = [np.asarray(p, _F32) for p in priors]

    def proposals(self, raw: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[K, 4]`` RPN proposals, best first (``RPNHead.predict_by_feat``, one image)."""
        rpn, cfg = self.rpn, self.rpn['test_cfg']
        nms_pre = int(cfg.get('nms_pre', -1))
        priors, deltas, scores, levels = [], [], [], []
        size = int(rpn['encode_size'])
        for level, anchors in enumerate(self.priors):
            logits = raw[f'raw1_{level}'][0]                   # [A * c, H, W]
            channels = int(rpn['cls_out_channels'])
            flat = logits.transpose(1, 2, 0).reshape(-1, channels)
            if rpn['use_sigmoid']:
                # sigmoid is monotonic: rank the logits (mmdet ranks the sigmoid scores)
                logit = flat.reshape(-1)
                idx = _top_k(logit, nms_pre if 0 < nms_pre < logit.size else logit.size)
                score = _sigmoid(logit[idx])
            else:
                prob = _softmax(flat)[:, :-1].reshape(-1)
                idx = _top_k(prob, nms_pre if 0 < nms_pre < prob.size else prob.size)
                score = prob[idx]
            # the kept anchors' deltas straight from the [A * size, H, W] map (index =
            # position * A + anchor), not a transposed copy of the whole map
            delta = raw[f'raw2_{level}'][0]
            pos, anchor = np.divmod(idx, len(delta) // size)
            deltas.append(delta.reshape(-1, size, delta.shape[1] * delta.shape[2])[
                anchor, :, pos])
            priors.append(anchors[idx])
            scores.append(score)
            levels.append(np.full(len(idx), level, np.int64))
        priors, deltas, scores, levels = (np.concatenate(t) for t in
                                          (priors, deltas, scores, levels))
        boxes = decode(rpn['coder'], priors, deltas, self.input_shape)   # all levels at once
        valid = size_mask(boxes, cfg.get('min_bbox_size', -1))
        boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
        keep = batched_nms(boxes, scores, levels, float(cfg['nms']['iou_threshold']),
                           int(cfg.get('max_per_img', 1000)))
        return boxes[keep].astype(_F32)

    def roi_features(self, raw: Mapping[str, np.ndarray], proposals: np.ndarray
                     ) -> np.ndarray:
        """``[K, C, h, w]`` RoI features of the proposals (``SingleRoIExtractor``)."""
        roi = self.roi
        feats = [raw[f'raw0_{i}'] for i in range(len(roi['strides']))]
        return extract_roi_features(feats, proposals, roi['strides'], roi['output_size'],
                                    int(roi['sampling_ratio']), bool(roi['aligned']),
                                    float(roi['finest_scale']))

    def detections(self, proposals: np.ndarray, cls_score: np.ndarray, bbox_pred: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """``BBoxHead._predict_by_feat_single`` + ``multiclass_nms`` → ``(dets [N, 5],
        labels [N])``."""
        rcnn, cfg = self.rcnn, self.rcnn['test_cfg']
        num_classes = int(rcnn['num_classes'])
        scores = _softmax(np.asarray(cls_score, _F32))[:, :-1]
        per_class = 1 if rcnn['reg_class_agnostic'] else num_classes
        rois = np.repeat(proposals, per_class, axis=0)
        deltas = np.asarray(bbox_pred, _F32).reshape(-1, int(rcnn['encode_size']))
        boxes = decode(rcnn['coder'], rois, deltas, self.input_shape).reshape(
            len(proposals), per_class, 4)
        boxes = np.broadcast_to(boxes, (len(proposals), num_classes, 4)).reshape(-1, 4)
        labels = np.tile(np.arange(num_classes, dtype=np.int64), len(proposals))
        scores = scores.reshape(-1)
        valid = np.nonzero(scores > _F32(cfg.get('score_thr', 0.0)))[0]
        return nms_detections(boxes[valid], scores[valid], labels[valid], cfg)


class TwoStagePipeline:
    """Image tensor → ``(dets [N, 5], labels [N])`` with two graphs and the NumPy steps.

    Args:
        post: the NumPy steps.
        graph1: image (input ``input_name``) → ``raw{i}_{j}`` outputs.
        graph2: ``{roi_input: [num_rois, C, h, w]}`` → ``raw0_0`` scores, ``raw1_0`` deltas;
            called on chunks of ``spec['num_rois']`` RoIs, the last zero-padded.
        input_name: graph 1's input.
    """

    def __init__(self, post: TwoStagePostProcessor, graph1: Graph, graph2: Graph,
                 input_name: str = 'input') -> None:
        self.post, self.graph1, self.graph2 = post, graph1, graph2
        self.input_name = input_name
        self.num_rois = int(post.spec['num_rois'])
        self.roi_input = post.spec.get('roi_input', 'roi_feats')

    def box_head(self, roi_feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Graph 2 on any number of RoIs (chunks of the static count, zero-padded)."""
        scores, deltas = [], []
        for start in range(0, len(roi_feats), self.num_rois):
            chunk = roi_feats[start:start + self.num_rois]
            valid = len(chunk)
            if valid < self.num_rois:
                chunk = np.concatenate([chunk, np.zeros((self.num_rois - valid,
                                                         *chunk.shape[1:]), _F32)])
            outs = self.graph2({self.roi_input: np.ascontiguousarray(chunk)})
            scores.append(outs['raw0_0'][:valid])
            deltas.append(outs['raw1_0'][:valid])
        return np.concatenate(scores), np.concatenate(deltas)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw = self.graph1({self.input_name: x})
        proposals = self.post.proposals(raw)
        if len(proposals) == 0:
            return np.zeros((0, 5), _F32), np.zeros(0, np.int64)
        cls_score, bbox_pred = self.box_head(self.post.roi_features(raw, proposals))
        return self.post.detections(proposals, cls_score, bbox_pred)
