"""How a deployment gets its PyTorch detector: built from a config, then quantized (a saved
``quantized.pth``, or calibration on given batches)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ['build_detector', 'quantize_for_deploy', 'dummy_batch', 'deploy_quant_cfg']


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
