"""mmdet's test-time preprocessing in NumPy + OpenCV: load (BGR), then either ``Resize``
(mmcv ``imrescale`` / ``imresize``, bilinear) with zero padding to the graph's static shape
(bottom / right, after normalizing), or YOLOv5's letterbox (``YOLOv5Letterbox``: long side
to ``scale``, centred padding with ``pad_val`` to the graph's static shape, before
normalizing); then ``DetDataPreprocessor`` (BGR→RGB, normalize)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ['Preprocess', 'PreparedImage', 'rescale_size', 'letterbox_params',
           'INTERPOLATIONS']

#: mmcv's interpolation names -> OpenCV flags (``mmcv.image.geometric.cv2_interp_codes``)
INTERPOLATIONS = {'nearest': 0, 'bilinear': 1, 'bicubic': 2, 'area': 3, 'lanczos': 4}


@dataclass
class PreparedImage:
    """The network input of one image and what undoes its resize."""

    tensor: np.ndarray              # [1, 3, H, W] float32
    img_shape: tuple[int, int]      # (h, w) after the resize
    ori_shape: tuple[int, int]      # (h, w) of the file
    scale_factor: tuple[float, float]  # (w scale, h scale)
    pad: tuple[int, int] = (0, 0)   # (top, left) padding before the image (letterbox)


def rescale_size(w: int, h: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv ``rescale_size``: the size for a keep-ratio resize into ``scale`` (long, short
    edge in any order)."""
    max_long, max_short = max(scale), min(scale)
    factor = min(max_long / max(h, w), max_short / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def letterbox_params(w: int, h: int, scale: int, out_shape: Sequence[int],
                     allow_upscale: bool = True) -> tuple[tuple[int, int], tuple[int, ...]]:
    """``YOLOv5Letterbox``'s arithmetic for a canvas of ``out_shape`` ``(H, W)``:
    ``((new_w, new_h), (top, bottom, left, right))``. The resize keeps the ratio with the
    long side at ``scale`` (Python's ``round``), the padding is split as Ultralytics'
    ``letterbox``: ``top = round(dh / 2 - 0.1)``, ``bottom = round(dh / 2 + 0.1)``."""
    ratio = scale / max(h, w)
    if not allow_upscale:
        ratio = min(ratio, 1.0)
    new_w, new_h = int(round(w * ratio)), int(round(h * ratio))
    out_h, out_w = int(out_shape[0]), int(out_shape[1])
    if new_h > out_h or new_w > out_w:
        raise ValueError(f'letterboxed image {(new_h, new_w)} is larger than the graph\'s '
                         f'static input {(out_h, out_w)}')
    dh, dw = (out_h - new_h) / 2, (out_w - new_w) / 2
    pads = (int(round(dh - 0.1)), int(round(dh + 0.1)), int(round(dw - 0.1)),
            int(round(dw + 0.1)))
    return (new_w, new_h), pads


class Preprocess:
    """The preprocessing of ``spec['preprocess']``.

    Keys: ``type`` (``'resize'``, the default, or ``'letterbox'``), ``mean``, ``std``,
    ``bgr_to_rgb``, ``input_shape`` (the graph's static ``[h, w]``); ``'resize'``:
    ``scale`` (``[w, h]`` of mmdet's ``Resize``) and ``keep_ratio``; ``'letterbox'``:
    ``scale`` (the long side), ``pad_val``, ``allow_upscale``, ``interpolation``.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.type = spec.get('type', 'resize')
        if self.type not in ('resize', 'letterbox'):
            raise ValueError(f"spec.json preprocess.type {self.type!r}; allowed: 'resize', "
                             "'letterbox'")
        if self.type == 'letterbox':
            self.long_side = int(spec['scale'])
            self.pad_val = int(spec['pad_val'])
            self.allow_upscale = bool(spec['allow_upscale'])
            if spec['interpolation'] not in INTERPOLATIONS:
                raise ValueError(f"spec.json preprocess.interpolation "
                                 f"{spec['interpolation']!r}; allowed: "
                                 f"{', '.join(INTERPOLATIONS)}")
            self.interpolation = INTERPOLATIONS[spec['interpolation']]
        else:
            self.scale = tuple(int(v) for v in spec['scale'])
            self.keep_ratio = bool(spec['keep_ratio'])
        self.mean = np.asarray(spec['mean'], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(spec['std'], np.float32).reshape(3, 1, 1)
        self.bgr_to_rgb = bool(spec['bgr_to_rgb'])
        self.input_shape = tuple(int(v) for v in spec['input_shape'])

    def load(self, path: str) -> np.ndarray:
        import cv2

        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f'cannot read image {path!r}')
        return img

    def __call__(self, img: np.ndarray) -> PreparedImage:
        """``img``: a BGR ``uint8`` image ``[h, w, 3]`` (as OpenCV / mmcv load it)."""
        import cv2

        if self.type == 'letterbox':
            return self.letterbox(img)
        h, w = img.shape[:2]
        size = rescale_size(w, h, self.scale) if self.keep_ratio else self.scale
        resized = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR) \
            if size != (w, h) else img
        new_h, new_w = resized.shape[:2]
        pad_h, pad_w = self.input_shape
        if new_h > pad_h or new_w > pad_w:
            raise ValueError(f'resized image {(new_h, new_w)} is larger than the graph\'s '
                             f'static input {self.input_shape}')
        chw = resized.transpose(2, 0, 1).astype(np.float32)
        if self.bgr_to_rgb:
            chw = chw[::-1]
        chw = (chw - self.mean) / self.std
        tensor = np.zeros((1, 3, pad_h, pad_w), np.float32)
        tensor[0, :, :new_h, :new_w] = chw
        return PreparedImage(tensor, (new_h, new_w), (h, w), (new_w / w, new_h / h))

    def letterbox(self, img: np.ndarray) -> PreparedImage:
        """``YOLOv5Letterbox`` onto the graph's static canvas, then normalize: the padding
        (``pad_val`` in every channel) is part of the image, as in the test pipeline."""
        import cv2

        h, w = img.shape[:2]
        (new_w, new_h), (top, _, left, _) = letterbox_params(
            w, h, self.long_side, self.input_shape, self.allow_upscale)
        if (new_w, new_h) != (w, h):
            img = cv2.resize(img, (new_w, new_h), interpolation=self.interpolation)
        canvas = np.full((*self.input_shape, img.shape[2]), self.pad_val, np.uint8)
        canvas[top:top + new_h, left:left + new_w] = img
        chw = canvas.transpose(2, 0, 1).astype(np.float32)
        if self.bgr_to_rgb:
            chw = chw[::-1]
        tensor = ((chw - self.mean) / self.std)[None]
        return PreparedImage(np.ascontiguousarray(tensor, np.float32), self.input_shape,
                             (h, w), (new_w / w, new_h / h), (top, left))
