"""Context managers shared by the calibration steps (quantization switches, grad flags)."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from ..quant import iter_quant_modules


@contextlib.contextmanager
def quant_disabled(model: nn.Module) -> Iterator[None]:
    """Switch every wrapper's quantization off; restore each one's switches afterwards."""
    layers = [m for _, m in iter_quant_modules(model)]
    saved = [(m.quant_weight, m.quant_input) for m in layers]
    try:
        for m in layers:
            m.set_quant(weight=False, input=False)
        yield
    finally:
        for m, (w, a) in zip(layers, saved):
            m.set_quant(weight=w, input=a)


@contextlib.contextmanager
def requires_grad(params: Iterable[nn.Parameter], flag: bool) -> Iterator[None]:
    """Set ``requires_grad`` of ``params`` to ``flag``; restore each one afterwards."""
    params = list(params)
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(flag)
        yield
    finally:
        for p, old in zip(params, saved):
            p.requires_grad_(old)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device('cpu')
