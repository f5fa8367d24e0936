"""Registries of mmdet-regptq.

Quantizers, PTQ methods and reconstruction loss terms are config-buildable by name.
They live in the package's own registries (scope ``mmdet_regptq``) so that the pure
PyTorch layers (``quant/``, ``calib/``) never import mmdet; hooks are registered
into mmdet's own ``HOOKS`` registry by ``engine/``.
"""
from __future__ import annotations

from typing import Any

from mmengine.registry import Registry

QUANTIZERS = Registry('quantizer', scope='mmdet_regptq')
PTQ_METHODS = Registry('ptq method', scope='mmdet_regptq')
RECON_LOSSES = Registry('reconstruction loss', scope='mmdet_regptq')


def build_from(registry: Registry, cfg: Any, field: str, **default_args: Any) -> Any:
    """Build ``cfg`` from ``registry``; a built object passes through.

    An unknown ``type`` raises a ``KeyError`` naming the config ``field`` and listing
    the registered names, instead of mmengine's generic message.
    """
    if not isinstance(cfg, dict):
        return cfg
    cfg = dict(cfg)
    name = cfg.get('type')
    if name is None:
        raise KeyError(f'{field}: missing "type"; allowed: {sorted(registry.module_dict)}')
    if isinstance(name, str) and registry.get(name) is None:
        raise KeyError(f'{field}.type={name!r} is unknown; allowed: {sorted(registry.module_dict)}')
    for key, value in default_args.items():
        cfg.setdefault(key, value)
    cfg.setdefault('_scope_', registry.scope)  # built from our registry under any default_scope
    return registry.build(cfg)
