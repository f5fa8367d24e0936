"""mmdet's test-time preprocessing in NumPy + OpenCV: load (BGR), ``Resize`` (mmcv
``imrescale`` / ``imresize``, bilinear), ``DetDataPreprocessor`` (BGR→RGB, normalize), and
zero padding to the graph's static shape (bottom / right, after normalizing)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ['Preprocess', 'PreparedImage', 'rescale_size']


@dataclass
class PreparedImage:
    """The network input of one image and what undoes its resize."""

    tensor: np.ndarray              # [1, 3, H, W] float32
    img_shape: tuple[int, int]      # (h, w) after the resize
    ori_shape: tuple[int, int]      # (h, w) of the file
    scale_factor: tuple[float, float]  # (w scale, h scale)


def rescale_size(w: int, h: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv ``rescale_size``: the size for a keep-ratio resize into ``scale`` (long, short
    edge in any order)."""
    max_long, max_short = max(scale), min(scale)
    factor = min(max_long / max(h, w), max_short / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


class Preprocess:
    """The preprocessing of ``spec['preprocess']``.

    Keys: ``scale`` (``[w, h]`` of mmdet's ``Resize``), ``keep_ratio``, ``mean``, ``std``,
    ``bgr_to_rgb``, ``input_shape`` (the graph's static ``[h, w]``).
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
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
