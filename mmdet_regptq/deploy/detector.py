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
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ['RawDetector', 'unflatten_raw', 'raw_output_names', 'build_detector',
           'quantize_for_deploy', 'dummy_batch', 'deploy_quant_cfg']

_NAME = re.compile(r'^raw(\d+)_(\d+)$')


def _flatten(out: Any) -> tuple[list[Tensor], list[str]]:
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
            graphs: ``two_stage.py``).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if not hasattr(detector, 'bbox_head') or hasattr(detector, 'roi_head'):
            raise NotImplementedError(
                f'{type(detector).__name__}: only single-stage dense detectors '
                '(bbox_head, no roi_head) export as one raw graph; a two-stage detector '
                'exports as two graphs (mmdet_regptq.deploy.two_stage: RpnStage, RoIStage)')
        self.detector = detector

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(_flatten(self.detector._forward(x))[0])


@torch.no_grad()
def raw_output_names(detector: nn.Module, x: Tensor) -> list[str]:
    """Graph output names ``raw{i}_{j}`` for ``detector._forward(x)``."""
    return _flatten(detector._forward(x))[1]


def unflatten_raw(outputs: Mapping[str, Tensor]) -> tuple[list[Tensor], ...]:
    """``{'raw0_0': t, ...}`` → ``([raw0_0, raw0_1, ...], [raw1_0, ...], ...)``."""
    grid: dict[int, dict[int, Tensor]] = {}
    for name, t in outputs.items():
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f'output {name!r} is not a raw output name (raw<i>_<j>)')
        grid.setdefault(int(m.group(1)), {})[int(m.group(2))] = t
    return tuple([levels[j] for j in sorted(levels)] for _, levels in sorted(grid.items()))


def build_detector(model_cfg: Any, checkpoint: str | None = None,
                   device: str = 'cpu') -> nn.Module:
    """Build an mmdet detector from a config (path or Config) in eval mode.

    ``init_cfg`` is honoured only when there is no checkpoint; a float checkpoint is loaded
    with mmengine (a quantized one is loaded by :func:`quantize_for_deploy`).
    """
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    cfg = Config.fromfile(model_cfg) if isinstance(model_cfg, (str, Path)) else model_cfg
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        load_checkpoint(model, str(checkpoint), map_location='cpu')
    model.cfg = cfg
    return model.to(device).eval()


def dummy_batch(model: nn.Module, shape: Sequence[int], *, seed: int = 0,
                num: int = 1) -> list[dict]:
    """Calibration-loader-shaped batches of random uint8 images of ``(H, W)``."""
    from mmdet.structures import DetDataSample

    h, w = shape
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        img = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                             pad_shape=(h, w), scale_factor=(1.0, 1.0)))
        batches.append({'inputs': [img], 'data_samples': [sample]})
    return batches


def deploy_quant_cfg(model_cfg: Any) -> dict | None:
    """The ``RegPTQHook`` entry of a config's ``custom_hooks`` (None if absent)."""
    for hook in model_cfg.get('custom_hooks', []) or []:
        if hook.get('type') in ('RegPTQHook', 'mmdet_regptq.RegPTQHook'):
            return dict(hook)
    return None


def quantize_for_deploy(model: nn.Module, *, quant: dict, method: Any,
                        quantized_checkpoint: str | None = None,
                        batches: Sequence[dict] | None = None,
                        input_shape: Sequence[int] = (512, 512)) -> dict:
    """Quantize ``model`` in place: load a saved quantized checkpoint, or calibrate.

    Args:
        model: the float detector (eval mode).
        quant: policy fields (as the hook's ``quant``; a checkpoint's ``meta['quant']``).
        method: the PTQ method (config or object).
        quantized_checkpoint: ``quantized.pth`` written by ``RegPTQHook`` /
            ``quantize_detector``; None = calibrate on ``batches``.
        batches: calibration batches as a loader yields them; None = random images of
            ``input_shape`` (fine for speed/size measurements, not for accuracy).
        input_shape: ``(H, W)`` of the random batches.

    Returns:
        ``quantize_detector``'s result dict.
    """
    from mmdet_regptq.engine import quantize_detector

    if batches is None:
        batches = dummy_batch(model, input_shape, num=1 if quantized_checkpoint else 2)
    return quantize_detector(model, batches, quant=quant, method=method,
                             quantized_checkpoint=quantized_checkpoint)
