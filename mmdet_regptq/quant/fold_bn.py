"""Fold BatchNorm into the preceding Conv2d, found by tensor identity in one hooked forward."""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .utils import eval_mode, removing, replace_module

__all__ = ['fold_bn', 'fold_conv_bn']

logger = logging.getLogger(__name__)

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn``'s eval-mode affine map into ``conv`` in place.

    ``w' = w * g / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * g / sqrt(var + eps) + beta``; a conv without bias gets one.
    Computed in float64, stored in the conv's dtype.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f'{type(bn).__name__} has no running statistics to fold')
    w = conv.weight
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + bn.eps)                      # [C_out]
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    new_bias = ((bias - mean) * factor + beta).to(w.dtype)
    w.data = (w.double() * factor.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.data = new_bias


def _trace_conv_bn(model: nn.Module, example_forward: Callable[[nn.Module], Any]
                   ) -> tuple[dict[nn.Module, list[nn.Module | None]], Counter]:
    """One eval-mode forward recording, for every BN call, the conv whose output it got."""
    produced: dict[int, tuple[Tensor, int, nn.Module]] = {}
    conv_calls: Counter = Counter()
    bn_sources: dict[nn.Module, list[nn.Module | None]] = defaultdict(list)

    def conv_hook(module: nn.Module, _inputs: tuple, output: Any) -> None:
        conv_calls[module] += 1
        if isinstance(output, Tensor):
            produced[id(output)] = (output, output._version, module)

    def bn_pre_hook(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0] if inputs else None
        entry = produced.get(id(x))
        same = entry is not None and entry[0] is x and entry[1] == x._version
        bn_sources[module].append(entry[2] if same else None)

    with removing([]) as handles:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(conv_hook))
            elif isinstance(module, _BN_TYPES):
                handles.append(module.register_forward_pre_hook(bn_pre_hook))
        try:
            with eval_mode(model), torch.no_grad():
                example_forward(model)
        finally:
            produced.clear()
    return bn_sources, conv_calls


def fold_bn(model: nn.Module, example_forward: Callable[[nn.Module], Any]
            ) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d whose input *is* a Conv2d's output tensor into that conv.

    ``example_forward(model)`` runs once in eval mode (``no_grad``) with hooks. A BN is
    folded when, in all of its calls, its input is the very tensor (``is``, unmodified in
    place) returned by one conv, that conv is called exactly as often and feeds no other BN.
    The BN is then replaced by ``nn.Identity`` in every parent that registers it. The conv's
    output is assumed to feed only the BN (the Conv-BN pattern of ResNet / ConvModule).

    Args:
        model: float model, changed in place.
        example_forward: runs one representative forward of ``model``.

    Returns:
        ``(conv_name, bn_name)`` of every folded pair, in execution order of the BNs.
    """
    names = {m: n for n, m in model.named_modules()}
    bn_sources, conv_calls = _trace_conv_bn(model, example_forward)
    claims = Counter(src for sources in bn_sources.values() for src in set(sources))
    folded: list[tuple[str, str]] = []
    for bn, sources in bn_sources.items():
        conv = sources[0]
        if conv is None or any(s is not conv for s in sources):
            continue
        if conv_calls[conv] != len(sources) or claims[conv] != 1:
            logger.info('not folding %s into %s: the conv output has other uses',
                        names[bn], names[conv])
            continue
        if bn.running_mean is None or bn.num_features != conv.out_channels:
            continue
        fold_conv_bn(conv, bn)
        replace_module(model, bn, nn.Identity())
        folded.append((names[conv], names[bn]))
    logger.info('folded %d BatchNorm layers into convolutions', len(folded))
    return folded
