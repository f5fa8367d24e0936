"""Quantized checkpoints: the calibrated model's state plus what it was made with.

A quantized checkpoint is only meaningful for the model, bits and method that produced
it, so loading checks all three and names the first mismatching layer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmdet_regptq.io import atomic_save

FORMAT_VERSION = 1


def save_quantized(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``{'state_dict', 'meta'}`` atomically (temp file + rename)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_save({'state_dict': state,
                        'meta': {**meta, 'format_version': FORMAT_VERSION}}, path)


def load_quantized(model: nn.Module, path: str | Path, expect: dict[str, Any] | None = None) -> dict:
    """Load a quantized checkpoint into an already quantized ``model``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a quantized checkpoint (corrupt or another kind),
            or it was made with other bits/method than ``expect``, or a layer differs
            (the message names the first one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'quantized_checkpoint={str(path)!r} does not exist')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means corrupt
        raise ValueError(f'quantized_checkpoint={str(path)!r} cannot be read '
                         f'(corrupt or not a torch file): {err}') from err
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'meta' not in ckpt:
        raise ValueError(f'quantized_checkpoint={str(path)!r} is not a quantized checkpoint '
                         f"(expected keys 'state_dict' and 'meta')")
    meta = ckpt['meta']
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise ValueError(f'quantized_checkpoint={str(path)!r} was made with '
                             f'{key}={meta.get(key)!r}, but this run asks for {key}={value!r}')
    _check_layers(model.state_dict(), ckpt['state_dict'], path)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    return meta


def _check_layers(own: dict, saved: dict, path: Path) -> None:
    for key in list(own) + [k for k in saved if k not in own]:
        if key not in saved:
            raise ValueError(f'{path}: layer {key!r} of the model is missing in the checkpoint')
        if key not in own:
            raise ValueError(f'{path}: checkpoint has {key!r}, which the model does not')
        if tuple(own[key].shape) != tuple(saved[key].shape):
            raise ValueError(f'{path}: {key!r} has shape {tuple(saved[key].shape)} in the '
                             f'checkpoint but {tuple(own[key].shape)} in the model')
