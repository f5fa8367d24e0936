"""Early checks of the hook's arguments: a bad value fails when the config is loaded (the
hook is built), naming the field and the allowed values, not minutes later in
``before_test``."""
from __future__ import annotations

import inspect
import logging
import re
import types
from typing import Any

from mmdet_regptq.registry import PTQ_METHODS, build_from

CALIB_KEYS = ('num_images', 'batch_size', 'seed', 'dataloader', 'num_workers')


def method_options(cls: type) -> list[str]:
    """Keyword options of a PTQ method class, gathered along its ``**kwargs`` chain."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None or klass is object:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]   # without self
        names.update(p.name for p in params
                     if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return sorted(names)


def build_method(method: Any) -> Any:
    """Build a PTQ method config (a built object passes through).

    Raises:
        KeyError: unknown ``type`` (lists the registered methods) or unknown option (lists
            the method's options).
        ValueError: an option out of range (the method's own check).
    """
    try:
        return build_from(PTQ_METHODS, method, 'method')
    except TypeError as err:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        name = method.get('type') if isinstance(method, dict) else None
        cls = name if inspect.isclass(name) else (
            PTQ_METHODS.get(name) if isinstance(name, str) else None)
        if found is None or cls is None:
            raise
        raise KeyError(f'method: unknown option(s) [{found.group(1)!r}] for {cls.__name__}; '
                       f'allowed: {method_options(cls)}') from None


def check_quant(quant: dict) -> None:
    """Build the policy of ``quant`` (the adapter's defaults left out) to check its fields."""
    from mmdet_regptq.engine.ptq import build_policy

    if not isinstance(quant, dict):
        raise TypeError(f'quant={quant!r} must be a dict of policy fields')
    build_policy(quant, types.SimpleNamespace(fp_layer_patterns=lambda: []))


def check_calib(calib: dict | None) -> dict:
    """``calib`` with its fields checked (names, types, ranges)."""
    calib = dict(calib or {})
    unknown = sorted(set(calib) - set(CALIB_KEYS))
    if unknown:
        raise KeyError(f'calib: unknown field(s) {unknown}; allowed: {list(CALIB_KEYS)}')
    for key, low in (('num_images', 1), ('batch_size', 1), ('num_workers', 0), ('seed', 0)):
        value = calib.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):
            raise ValueError(f'calib.{key}={value!r} must be an int >= {low}')
    loader = calib.get('dataloader')
    if loader is not None and not (isinstance(loader, dict)
                                   and isinstance(loader.get('dataset'), dict)):
        raise ValueError(f'calib.dataloader={loader!r} must be a dict with a dataset=dict(...)')
    return calib


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f'{name}={value!r} must be True or False')
    return value


def check_unmatched(report: Any, quant: dict, *, strict: bool,
                    logger: logging.Logger) -> list[str]:
    """The user's ``fp_layers`` / ``overrides`` regexes that match no layer of the model.

    A typo in a regex would silently drop an override (an 8-bit layer quantized to 4 bits):
    an error with ``strict``, else a warning in the run's log.
    """
    own = {f'fp_layers: {p}' for p in quant.get('fp_layers', []) or []}
    own |= {f'overrides: {p}' for p in quant.get('overrides', {}) or {}}
    unmatched = [p for p in report.unmatched_patterns if p in own]
    if unmatched:
        msg = (f'quant: regex(es) matching no quantizable layer: {unmatched} (names are '
               "matched with re.fullmatch against the report's layer names, e.g. "
               f'{[layer.name for layer in report.layers[:3]]})')
        if strict:
            raise ValueError(msg + '; fix the pattern or pass strict=False to only warn')
        logger.warning(msg)
    return unmatched
