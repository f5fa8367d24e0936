"""YOLOv5 (``mmdet_regptq.yolov5.YOLOv5Head``) as one end-to-end graph: image → ``dets`` +
``labels``.

Mirrors ``YOLOv5Head.predict_by_feat`` without ``rescale`` (boxes in the letterboxed input;
the caller undoes the letterbox): sigmoid of every map, the head's own box coder on
priors and strides precomputed for the static input shape, score ``objectness * class``,
every (box, class) pair above ``score_thr`` (multi-label) or the best class of each box,
the ``nms_pre`` best, class-aware NMS and ``max_per_img``. The top ``nms_pre`` of all pairs
thresholded afterwards is the same set as mmdet's threshold-then-top-k, with a static ``k``.
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
        boxes = head.bbox_coder.decode(self.priors, preds[:, :4], self.strides)
        scores = preds[:, 4:5] * preds[:, 5:]
        num_classes = scores.shape[1]
        if self.cfg.get('multi_label', True):
            flat = scores.reshape(-1)
            top, idx = flat.topk(min(int(self.cfg['nms_pre']), int(flat.shape[0])))
            box_idx = torch.div(idx, num_classes, rounding_mode='floor')
            labels = idx - box_idx * num_classes
        else:
            best, best_labels = scores.max(dim=1)
            top, box_idx = best.topk(min(int(self.cfg['nms_pre']), int(best.shape[0])))
            labels = best_labels[box_idx]
        valid = top > float(self.cfg['score_thr'])
        return nms_outputs(boxes[box_idx], top, labels, valid, self.cfg, num_classes,
                           self.nms)
