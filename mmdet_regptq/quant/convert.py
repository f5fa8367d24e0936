"""``quantize_model``: swap Conv2d / Linear / MultiheadAttention for quantized wrappers.

Module swapping (``setattr`` on the parent), never torch.fx tracing. Wrapper classes are
looked up by float type in :data:`WRAPPERS` along the module's MRO (no ``if/elif``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..registry import QUANTIZERS, build_from
from .fold_bn import fold_bn
from .modules import QuantConv2d, QuantLinear, QuantModule, QuantMultiheadAttention
from .policy import QuantPolicy
from .quantizers import Quantizer
from .utils import eval_mode, removing, replace_module

__all__ = ['WRAPPERS', 'SAFE_SUBCLASSES', 'LayerInfo', 'QuantReport', 'quantize_model',
           'find_quantizable', 'iter_quant_modules', 'set_quant_state', 'set_drop_prob',
           'restore_float']

logger = logging.getLogger(__name__)

#: float module type → wrapper type; the most derived registered base wins.
WRAPPERS: dict[type[nn.Module], type[QuantModule]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    nn.MultiheadAttention: QuantMultiheadAttention,
}

#: Subclasses (``module.QualName``) that override ``forward`` but compute the same function
#: as their torch base, so the wrapper's functional forward is exact for them.
SAFE_SUBCLASSES: set[str] = {
    'mmcv.cnn.bricks.wrappers.Conv2d',
    'mmcv.cnn.bricks.wrappers.Linear',
    'torch.nn.modules.linear.NonDynamicallyQuantizableLinear',
}

_OVERRIDABLE = ('forward', '_conv_forward')


@dataclass(frozen=True)
class LayerInfo:
    """One row of the layer table.

    Attributes:
        name: fully-qualified module name.
        type: float module class name.
        w_bits: weight bits (``None`` = FP).
        a_bits: input bits (``None`` = FP).
        kind: weight quantizer kind (``'Uniform'``, ...) or ``'FP'``.
        note: why an eligible layer stayed FP, or ``'first'`` for the first layer.
    """

    name: str
    type: str
    w_bits: int | None
    a_bits: int | None
    kind: str
    note: str = ''


@dataclass
class QuantReport:
    """What ``quantize_model`` did.

    Attributes:
        layers: one :class:`LayerInfo` per eligible layer, in module order.
        folded_bn: ``(conv_name, bn_name)`` of each folded BatchNorm.
        first_layer: name of the first layer (``None`` if disabled).
        unmatched_patterns: policy regexes (``'field: regex'``) that matched no layer.
    """

    layers: list[LayerInfo] = field(default_factory=list)
    folded_bn: list[tuple[str, str]] = field(default_factory=list)
    first_layer: str | None = None
    unmatched_patterns: list[str] = field(default_factory=list)

    @property
    def num_quantized(self) -> int:
        """Number of wrapped layers."""
        return sum(row.kind != 'FP' for row in self.layers)

    @property
    def num_eligible(self) -> int:
        """Number of Conv2d / Linear / MultiheadAttention layers considered."""
        return len(self.layers)

    def table(self) -> str:
        """Aligned text table: name, type, W bits, A bits, quantizer kind, note."""
        header = ('name', 'type', 'W', 'A', 'quantizer', 'note')
        rows = [header] + [(r.name, r.type, _bits(r.w_bits), _bits(r.a_bits), r.kind, r.note)
                           for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                 for row in rows]
        lines.insert(1, '  '.join('-' * w for w in widths))
        lines.append(self.summary())
        return '\n'.join(lines)

    def summary(self) -> str:
        """One line: quantized / eligible layers and folded BatchNorms."""
        return (f'quantized {self.num_quantized} / {self.num_eligible} eligible layers; '
                f'{len(self.folded_bn)} BatchNorm folded')

    def __str__(self) -> str:
        return self.table()


def _bits(bits: int | None) -> str:
    return 'FP' if bits is None else str(bits)


def _wrapper_type(module: nn.Module) -> type[QuantModule] | None:
    for cls in type(module).__mro__:
        if cls in WRAPPERS:
            return WRAPPERS[cls]
    return None


def _custom_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    cls = type(module)
    if cls is base or f'{cls.__module__}.{cls.__qualname__}' in SAFE_SUBCLASSES:
        return False
    return any(getattr(cls, m, None) is not getattr(base, m, None) for m in _OVERRIDABLE)


def find_quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Eligible float layers in module order, skipping the children of an eligible layer
    (``MultiheadAttention.out_proj`` is handled by its wrapper).

    Raises:
        ValueError: if ``model`` already contains quantized wrappers.
    """
    found: list[tuple[str, nn.Module]] = []
    covered: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in covered:
            continue
        if isinstance(module, QuantModule):
            raise ValueError(f'{type(model).__name__} is already quantized ({name!r} is a '
                             f'{type(module).__name__}); restore_float() it first')
        if _wrapper_type(module) is not None:
            found.append((name, module))
            covered.update(id(m) for m in module.modules())
    return found


def _first_executed(model: nn.Module, layers: list[tuple[str, nn.Module]],
                    example_forward: Callable[[nn.Module], Any]) -> str | None:
    order: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda *_, n=name: order.append(n))
             for name, module in layers]
    with removing(hooks), eval_mode(model), torch.no_grad():
        example_forward(model)
    return order[0] if order else None


def _resolve_first_layer(model: nn.Module, policy: QuantPolicy,
                         layers: list[tuple[str, nn.Module]],
                         example_forward: Callable[[nn.Module], Any] | None) -> str | None:
    if policy.first_layer is None:
        return None
    if policy.first_layer == 'auto':
        if example_forward is None:
            raise ValueError("first_layer='auto' needs example_forward to find the first layer; "
                             'pass example_forward, a module name or first_layer=None')
        return _first_executed(model, layers, example_forward)
    names = [name for name, _ in layers]
    if policy.first_layer not in names:
        raise ValueError(f'first_layer={policy.first_layer!r} is not a Conv2d/Linear/'
                         f'MultiheadAttention of {type(model).__name__}; e.g. {names[:5]}')
    return policy.first_layer


def _build_wrapper(name: str, module: nn.Module, policy: QuantPolicy, w_bits: int,
                   a_bits: int) -> QuantModule:
    wrapper_type = _wrapper_type(module)
    assert wrapper_type is not None
    act_cfg = dict(policy.act, bits=a_bits)
    if act_cfg.get('per_channel'):
        act_cfg.setdefault('ch_axis', wrapper_type.act_ch_axis)
    weight_q = build_from(QUANTIZERS, policy.weight_cfg(w_bits), 'weight')
    input_q = build_from(QUANTIZERS, act_cfg, 'act')
    wrapper = wrapper_type(module, weight_q, input_q)
    for sub_name, sub in wrapper.named_modules():
        if isinstance(sub, Quantizer):
            sub.name = f'{name}.{sub_name}'
    wrapper.init_weight_quantizers()
    return wrapper


def _unmatched(policy: QuantPolicy, names: list[str]) -> list[str]:
    return [f'{fld}: {pattern}' for fld, patterns in policy.patterns().items()
            for pattern in patterns if not any(re.fullmatch(pattern, n) for n in names)]


def quantize_model(model: nn.Module, policy: QuantPolicy | Mapping[str, Any],
                   example_forward: Callable[[nn.Module], Any] | None = None) -> QuantReport:
    """Quantize ``model`` in place by module swapping.

    Steps: fold BatchNorm (``policy.fold_bn``), find the first layer, then wrap every
    eligible Conv2d / Linear / MultiheadAttention not kept FP, initialising its weight
    quantizers from the weights. Input quantizers are left un-initialised: run
    :func:`~mmdet_regptq.quant.observers.init_activation_quantizers` next.

    Args:
        model: float model (changed in place).
        policy: a :class:`QuantPolicy` or a dict of its fields.
        example_forward: ``example_forward(model)`` runs one representative forward; needed
            by ``fold_bn=True`` and ``first_layer='auto'``. Runs in eval mode, no grad.

    Returns:
        A :class:`QuantReport` (``report.table()`` for the layer table).

    Raises:
        ValueError: no quantizable layer, already quantized, or a policy that needs
            ``example_forward`` without one.
    """
    policy = QuantPolicy.from_cfg(policy)
    layers = find_quantizable(model)
    if not layers:
        raise ValueError(f'no Conv2d/Linear/MultiheadAttention to quantize in '
                         f'{type(model).__name__}')
    report = QuantReport()
    if policy.fold_bn:
        if example_forward is None:
            raise ValueError('fold_bn=True needs example_forward (one forward finds the '
                             'Conv-BN pairs); pass example_forward or set fold_bn=False')
        report.folded_bn = fold_bn(model, example_forward)
    report.first_layer = _resolve_first_layer(model, policy, layers, example_forward)
    report.unmatched_patterns = _unmatched(policy, [name for name, _ in layers])
    for pattern in report.unmatched_patterns:
        logger.warning('quant policy regex matches no layer: %s', pattern)
    for name, module in layers:
        kind = type(module).__name__
        base = next(c for c in type(module).__mro__ if c in WRAPPERS)
        reason = policy.fp_reason(name) or ('custom forward' if _custom_forward(module, base)
                                            else None)
        if reason is not None:
            report.layers.append(LayerInfo(name, kind, None, None, 'FP', reason))
            continue
        is_first = name == report.first_layer
        w_bits, a_bits = policy.bits_for(name, is_first=is_first)
        wrapper = _build_wrapper(name, module, policy, w_bits, a_bits)
        replace_module(model, module, wrapper)
        report.layers.append(LayerInfo(name, kind, w_bits, a_bits, policy.weight['type'],
                                       'first' if is_first else ''))
    logger.info('%s', report.summary())
    return report


# ---------------------------------------------------------------------- model-wide helpers
def iter_quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    """``(name, wrapper)`` for every :class:`QuantModule` in ``model`` (module order)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            yield name, module


def set_quant_state(model: nn.Module, weight: bool | None = None,
                    input: bool | None = None) -> None:
    """Switch weight / input quantization of every wrapper (``None`` leaves it unchanged)."""
    for _, module in iter_quant_modules(model):
        module.set_quant(weight=weight, input=input)


def set_drop_prob(model: nn.Module, p: float) -> None:
    """Set the QDrop probability ``p`` (0..1) of every wrapper."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f'drop_prob={p} is out of range; allowed 0..1')
    for _, module in iter_quant_modules(model):
        module.drop_prob = p


def restore_float(model: nn.Module) -> list[str]:
    """Swap every wrapper back for its float module; returns the restored names."""
    restored: list[str] = []
    for _, module in list(iter_quant_modules(model)):
        restored += replace_module(model, module, module.to_float())
    return restored
