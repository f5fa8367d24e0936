"""Which weighted layers of a detector belong to which part: backbone, neck, and the head's
classification, regression and shared layers.

Head layers are the Conv2d/Linear modules that the adapter's ``head_layer_patterns()``
match, plus those under any top-level child whose name ends in ``head`` (``rpn_head``,
``roi_head``: two-stage detectors). Inside the head, a layer's role comes from its name
with the ``*_head`` components removed (``roi_head.bbox_head.fc_reg`` -> ``fc_reg``):

- ``cls``: a component mentions scores - ``cls``, ``centerness``, ``obj``, ``logits``,
  ``score`` (RetinaNet ``cls_convs.*`` and ``retina_cls``, RPN ``rpn_cls``, RoI ``fc_cls``);
- ``reg``: a component mentions boxes - ``reg``, ``bbox``, ``box``, ``offset``, ``pts``,
  ``wh``, ``delta`` (``reg_convs.*``, ``retina_reg``, ``rpn_reg``, ``fc_reg``);
- ``shared``: the rest (``rpn_conv``, the RoI head's ``shared_fcs``), feeding both.

The regexes can be replaced (``cls_pattern`` / ``reg_pattern``, ``re.fullmatch`` on the
full name) when a head names its layers otherwise.
"""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from mmdet_regptq.models.adapters import DetectorAdapter, final_layer_patterns

__all__ = ['PARTS', 'layer_parts', 'weighted_layers', 'is_final_layer']

#: Every part name, in display order.
PARTS = ('cls', 'reg', 'shared', 'backbone', 'neck')

_CLS_TOKEN = re.compile(r'.*(cls|centerness|obj|logits|score).*')
_REG_TOKEN = re.compile(r'.*(reg|bbox|box|offset|pts|wh|delta).*')
_WEIGHTED = (nn.Conv2d, nn.Linear)


def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d / Linear modules by fully-qualified name (quantized wrappers: the float one)."""
    from mmdet_regptq.quant import QuantModule

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            out[name] = module.module
        elif isinstance(module, _WEIGHTED) and not name.endswith('.module'):
            out[name] = module
    return out


def _is_head(name: str, adapter: DetectorAdapter | None) -> bool:
    if name.split('.')[0].endswith('head'):
        return True
    patterns = adapter.head_layer_patterns() if adapter is not None else []
    return any(re.fullmatch(p, name) for p in patterns)


def _role(name: str) -> str:
    tokens = [t for t in name.split('.') if not t.endswith('head') and not t.isdigit()]
    if any(_CLS_TOKEN.fullmatch(t) for t in tokens):
        return 'cls'
    if any(_REG_TOKEN.fullmatch(t) for t in tokens):
        return 'reg'
    return 'shared'


def layer_parts(model: nn.Module, adapter: DetectorAdapter | None = None, *,
                cls_pattern: str | None = None, reg_pattern: str | None = None,
                include_final: bool = True) -> dict[str, list[str]]:
    """Weighted layer names per part (``PARTS``), in module order.

    Args:
        model: the detector (float or quantized).
        adapter: its adapter (head scopes); None = heads found by name only.
        cls_pattern: regex (fullmatch) overriding the classification-branch rule.
        reg_pattern: regex (fullmatch) overriding the regression-branch rule.
        include_final: keep the final prediction layers (``retina_cls``, ``fc_reg``, ...).
    """
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    for name in weighted_layers(model):
        if not include_final and is_final_layer(name):
            continue
        top = name.split('.')[0]
        if cls_pattern is not None and re.fullmatch(cls_pattern, name):
            parts['cls'].append(name)
        elif reg_pattern is not None and re.fullmatch(reg_pattern, name):
            parts['reg'].append(name)
        elif _is_head(name, adapter):
            role = _role(name)
            if (role == 'cls' and cls_pattern is not None) or \
                    (role == 'reg' and reg_pattern is not None):
                role = 'shared'
            parts[role].append(name)
        elif top in ('backbone', 'neck'):
            parts[top].append(name)
    return parts


def is_final_layer(name: str, patterns: Iterable[str] | None = None) -> bool:
    """Whether ``name`` is one of the final prediction layers (kept FP by default)."""
    return any(re.fullmatch(p, name) for p in (patterns or final_layer_patterns()))
