"""Detectors for deployment: the raw network (no NMS) as a flat-output module, and how a
deployment gets its quantized model.

The exported graph is what mmdeploy exports for a detector's backbone + head when the
post-processing runs outside the backend (its RKNN / partition path): input = the
preprocessed image batch ``[N, 3, H, W]`` (after ``data_preprocessor``), outputs = the
tensors of ``model._forward(x)``, e.g. RetinaNet's per-level ``cls_score`` and
``bbox_pred``. They are flattened to graph outputs named ``raw{i}_{j}`` (output ``i`` of
``_forward``, level ``j``) and put back into that structure by :func:`unflatten_raw`
before mmdet's own ``bbox_head.predict_by_feat`` decodes them and runs NMS in PyTorch.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = ['RawDetector', 'unflatten_raw', 'raw_output_names', 'flatten_outputs']

_NAME = re.compile(r'^raw(\d+)_(\d+)$')


def flatten_outputs(out: Any) -> tuple[list[Tensor], list[str]]:
    """Tensors of a (tuple of per-level lists) output and their names ``raw{i}_{j}``."""
    tensors: list[Tensor] = []
    names: list[str] = []
    if isinstance(out, Tensor):
        out = (out,)
    for i, item in enumerate(out):
        items = [item] if isinstance(item, Tensor) else list(item)
        for j, t in enumerate(items):
            if not isinstance(t, Tensor):
                raise TypeError(f'_forward output {i}.{j} is a {type(t).__name__}, not a '
                                'tensor: this detector has no tensor-only raw forward')
            tensors.append(t)
            names.append(f'raw{i}_{j}')
    return tensors, names


class RawDetector(nn.Module):
    """``detector._forward(x)`` with its (tuple of per-level lists) outputs flattened.

    Args:
        detector: an mmdet single-stage detector (float or quantized).

    Raises:
        NotImplementedError: two-stage / query-based detectors, whose ``_forward`` runs
            NMS or set prediction with data-dependent shapes (two-stage ones deploy as two
            graphs: ``detectors/two_stage.py``).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if not hasattr(detector, 'bbox_head') or hasattr(detector, 'roi_head'):
            raise NotImplementedError(
                f'{type(detector).__name__}: only single-stage dense detectors '
                '(bbox_head, no roi_head) export as one raw graph; a two-stage detector '
                'exports as two graphs (deploy.detectors.two_stage: RpnStage, RoIStage)')
        self.detector = detector

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(flatten_outputs(self.detector._forward(x))[0])


@torch.no_grad()
def raw_output_names(detector: nn.Module, x: Tensor) -> list[str]:
    """Graph output names ``raw{i}_{j}`` for ``detector._forward(x)``."""
    return flatten_outputs(detector._forward(x))[1]


def unflatten_raw(outputs: Mapping[str, Tensor]) -> tuple[list[Tensor], ...]:
    """``{'raw0_0': t, ...}`` → ``([raw0_0, raw0_1, ...], [raw1_0, ...], ...)``."""
    grid: dict[int, dict[int, Tensor]] = {}
    for name, t in outputs.items():
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f'output {name!r} is not a raw output name (raw<i>_<j>)')
        grid.setdefault(int(m.group(1)), {})[int(m.group(2))] = t
    return tuple([levels[j] for j in sorted(levels)] for _, levels in sorted(grid.items()))
