"""YOLOv5 (``mmdet_regptq.yolov5.YOLOv5Head``) as one end-to-end graph: image → ``dets`` +
``labels``.

Mirrors ``YOLOv5Head.predict_by_feat`` without ``rescale`` (boxes in the letterboxed input;
the caller undoes the letterbox): sigmoid of every map, score ``objectness * class``, every
(box, class) pair above ``score_thr`` (multi-label) or the best class of each box, the
``nms_pre`` best (``TopK`` with ``k = min(nms_pre, candidates)``), the head's own box coder
on the priors and strides precomputed for the static input shape, class-aware NMS and
``max_per_img``. Boxes whose objectness is not above ``score_thr`` are dropped first (no
score of theirs can pass): at 640 a ``TopK`` over all 25200 x 80 pairs took 75-80 ms of
ONNX Runtime's time on one thread, more than half the network's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mmdet_regptq.deploy.detectors.end2end import check_nms_kind, nms_outputs

__all__ = ['YOLOv5End2End', 'is_yolov5']


def is_yolov5(detector: nn.Module) -> bool:
    """Whether the detector has a ``YOLOv5Head``."""
    return type(getattr(detector, 'bbox_head', None)).__name__ == 'YOLOv5Head'


class YOLOv5End2End(nn.Module):
    """A YOLOv5 detector (float or quantized) as one graph (module doc).

    Args:
        detector: an mmdet detector with a ``YOLOv5Head``, in eval mode.
        input_shape: the static ``(H, W)`` of the graph.
        nms: ``'onnx'`` or ``'tensorrt'`` (``end2end.nms_outputs``).
    """

    def __init__(self, detector: nn.Module, input_shape: Sequence[int], nms: str = 'onnx'
                 ) -> None:
        super().__init__()
        if not is_yolov5(detector):
            raise TypeError(f'{type(detector).__name__} has no YOLOv5Head')
        self.detector = detector
        self.head = detector.bbox_head
        self.nms = check_nms_kind(nms)
        self.input_shape = (int(input_shape[0]), int(input_shape[1]))
        self.cfg = dict(self.head.test_cfg)
        with torch.no_grad():
            maps = self.head(detector.extract_feat(torch.zeros(1, 3, *self.input_shape)))[0]
        priors = self.head.prior_generator.grid_priors([m.shape[-2:] for m in maps],
                                                       dtype=torch.float32, device='cpu')
        strides = torch.cat([p.new_full((p.shape[0],), float(s))
                             for p, s in zip(priors, self.head.strides)])
        self.level_priors = [int(len(p)) for p in priors]   # priors per level
        self.register_buffer('priors', torch.cat(priors), persistent=False)
        self.register_buffer('strides', strides, persistent=False)

    @property
    def max_per_img(self) -> int:
        """Most detections per image (the static row count of a TensorRT graph)."""
        return int(self.cfg.get('max_per_img', 300))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        head = self.head
        maps = head(self.detector.extract_feat(x))[0]
        preds = torch.cat([m[0].permute(1, 2, 0).reshape(-1, head.num_attrib) for m in maps])
        preds = preds.sigmoid()
        thr = float(self.cfg['score_thr'])
        # objectness bounds every score (objectness x class, class <= 1): only boxes above
        # the threshold can have a pair above it (exact, and the graph scores thousands of
        # boxes instead of all 25200 x 80 pairs at 640)
        box_idx = torch.nonzero(preds[:, 4] > thr).reshape(-1)
        preds = preds[box_idx]
        scores = preds[:, 4:5] * preds[:, 5:]
        num_classes = scores.shape[1]
        if self.cfg.get('multi_label', True):
            flat = scores.reshape(-1)
            pairs = torch.nonzero(flat > thr).reshape(-1)
            top, order = _topk(flat[pairs], int(self.cfg['nms_pre']))
            pairs = pairs[order]
            local = torch.div(pairs, num_classes, rounding_mode='floor')
            labels = pairs - local * num_classes
        else:
            best, best_labels = scores.max(dim=1)
            keep = torch.nonzero(best > thr).reshape(-1)
            top, order = _topk(best[keep], int(self.cfg['nms_pre']))
            local = keep[order]
            labels = best_labels[local]
        idx = box_idx[local]
        boxes = head.bbox_coder.decode(self.priors[idx], preds[local, :4], self.strides[idx])
        valid = torch.ones_like(top, dtype=torch.bool)
        return nms_outputs(boxes, top, labels, valid, self.cfg, num_classes, self.nms)


def _topk(values: Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """The ``min(k_max, len)`` largest values, best first (mmdet's threshold-then-top-k).
    While tracing, ``len`` is the graph's own (``TopK`` with a computed ``k``, as
    MMDeploy's dynamic ``topk`` rewrite does)."""
    n = values.shape[0]
    k = torch.clamp(n, max=k_max) if isinstance(n, Tensor) else min(int(n), k_max)
    return values.topk(k)
