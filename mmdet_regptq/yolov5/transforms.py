"""``YOLOv5Letterbox``: Ultralytics' test-time letterbox as an mmdet transform."""
from __future__ import annotations

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform
from mmdet.registry import TRANSFORMS

__all__ = ['YOLOv5Letterbox']


@TRANSFORMS.register_module()
class YOLOv5Letterbox(BaseTransform):
    """Resize the long side to ``scale`` (keep ratio), pad to a multiple of ``size_divisor``.

    The padding (value ``pad_val``) is split between both sides, centring the image, as
    Ultralytics' ``letterbox(auto=True)``: ``top = round(dh / 2 - 0.1)``,
    ``bottom = round(dh / 2 + 0.1)`` (and the same for left / right).

    Sets ``img``, ``img_shape`` (the padded canvas), ``scale_factor`` ``(w, h)``,
    ``pad_param`` ``[top, bottom, left, right]`` (read by ``YOLOv5Head`` to map boxes back)
    and ``keep_ratio``; ``gt_bboxes``, when loaded, are mapped onto the canvas.

    Args:
        scale: target long side (640).
        size_divisor: pad height and width up to a multiple of this (32, the largest stride).
        pad_val: padding value of every channel (114).
        allow_upscale: enlarge images smaller than ``scale`` (Ultralytics' default: True).
        interpolation: mmcv interpolation (``'bilinear'`` = cv2.INTER_LINEAR).
    """

    def __init__(self, scale: int = 640, size_divisor: int = 32, pad_val: int = 114,
                 allow_upscale: bool = True, interpolation: str = 'bilinear') -> None:
        for name, value in (('scale', scale), ('size_divisor', size_divisor)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'YOLOv5Letterbox: {name}={value!r} must be a positive int')
        self.scale = scale
        self.size_divisor = size_divisor
        self.pad_val = pad_val
        self.allow_upscale = allow_upscale
        self.interpolation = interpolation

    def transform(self, results: dict) -> dict:
        img = results['img']
        h, w = img.shape[:2]
        ratio = self.scale / max(h, w)
        if not self.allow_upscale:
            ratio = min(ratio, 1.0)
        new_w, new_h = int(round(w * ratio)), int(round(h * ratio))
        if (new_w, new_h) != (w, h):
            img = mmcv.imresize(img, (new_w, new_h), interpolation=self.interpolation)
        dw = (-new_w) % self.size_divisor / 2
        dh = (-new_h) % self.size_divisor / 2
        top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
        left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
        # a tuple: cv2 pads only the first channel with a scalar value
        fill = tuple([self.pad_val] * img.shape[2]) if img.ndim == 3 else self.pad_val
        img = mmcv.impad(img, padding=(left, top, right, bottom), pad_val=fill)
        scale_factor = (new_w / w, new_h / h)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['scale_factor'] = scale_factor
        results['keep_ratio'] = True
        results['pad_param'] = np.array([top, bottom, left, right], dtype=np.float32)
        if results.get('gt_bboxes') is not None:
            results['gt_bboxes'].rescale_(scale_factor)
            results['gt_bboxes'].translate_([left, top])
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(scale={self.scale}, size_divisor={self.size_divisor}, '
                f'pad_val={self.pad_val}, allow_upscale={self.allow_upscale}, '
                f'interpolation={self.interpolation!r})')
