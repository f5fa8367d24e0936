"""``QuantPolicy``: which layers are quantized, at which bit widths, with which quantizers."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..errors import UnknownFieldError
from ..registry import QUANTIZERS, build_from
from . import quantizers as _quantizers  # noqa: F401  (registers 'Uniform', 'AdaRound')

__all__ = ['QuantPolicy', 'W_BITS_RANGE', 'A_BITS_RANGE']

W_BITS_RANGE = (2, 8)
A_BITS_RANGE = (2, 16)
#: the weight bit width ``w_reduce_range`` narrows (<= 7-bit grids already fit AVX2's u8 x s8)
REDUCED_BITS = 8
_REDUCED = dict(symmetric=True, reduce_range=True)
_OVERRIDE_KEYS = {'w_bits': W_BITS_RANGE, 'a_bits': A_BITS_RANGE}


def _default_weight_cfg() -> dict[str, Any]:
    return dict(type='Uniform', per_channel=True, symmetric=False, scale_method='lp', p=2.4)


def _default_act_cfg() -> dict[str, Any]:
    return dict(type='Uniform', per_channel=False, symmetric=False, scale_method='lp', p=2.4)


def _check_bits(field_name: str, value: Any, allowed: tuple[int, int]) -> None:
    lo, hi = allowed
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f'{field_name}={value!r} is out of range; allowed {lo}..{hi}')


def _check_patterns(field_name: str, patterns: Any) -> list[str]:
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise ValueError(f'{field_name}={patterns!r} must be a list of regex strings')
    for pattern in patterns:
        _check_regex(field_name, pattern)
    return list(patterns)


def _check_regex(field_name: str, pattern: Any) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f'{field_name}: {pattern!r} is not a string regex')
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f'{field_name}: {pattern!r} is not a valid regex ({err})') from None


@dataclass
class QuantPolicy:
    """Quantization policy, validated on construction (``ValueError`` naming the field).

    Layer names are fully-qualified module names matched with ``re.fullmatch``.

    Attributes:
        w_bits: weight bits, 2..8.
        a_bits: input-activation bits, 2..16.
        first_layer_bits: W and A bits of the first layer, 2..8 (``None`` = no special case).
        first_layer: ``'auto'`` (the first Conv2d/Linear/MultiheadAttention executed by
            ``example_forward``), a fully-qualified module name, or ``None`` (no first layer).
        fp_layers: regexes of layers kept in floating point (not wrapped).
        final_layers: regexes of the final prediction layers; kept FP unless
            ``quantize_final`` (the mmdet adapters fill this in).
        quantize_final: quantize ``final_layers`` too (at ``w_bits`` / ``a_bits``).
        overrides: regex → ``{'w_bits': .., 'a_bits': ..}`` (either key optional); the first
            matching regex wins and takes precedence over the first-layer rule.
        weight: weight quantizer config (``QUANTIZERS``; ``bits`` is added per layer).
        act: input-activation quantizer config (``QUANTIZERS``; ``bits`` added per layer;
            ``ch_axis`` defaults to the wrapper's channel axis when ``per_channel``).
        fold_bn: fold BatchNorm into the preceding conv before wrapping.
        w_reduce_range: every 8-bit weight grid becomes symmetric ``-64..64`` (the weight
            quantizer's ``symmetric=True, reduce_range=True``; ONNX Runtime's
            ``reduce_range``), so ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI
            (AVX2, whose int16 pair sums saturate for ``|q| > 64``) compute the layer
            exactly and the INT8 export stores it as int8. Weights of <= 7 bits already
            fit and are unchanged. Needs a ``'Uniform'`` weight quantizer (AdaRound-based
            methods keep its grid; LLAQ layers keep their own).
    """

    w_bits: int = 4
    a_bits: int = 4
    first_layer_bits: int | None = 8
    first_layer: str | None = 'auto'
    fp_layers: list[str] = field(default_factory=list)
    final_layers: list[str] = field(default_factory=list)
    quantize_final: bool = False
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)
    weight: dict[str, Any] = field(default_factory=_default_weight_cfg)
    act: dict[str, Any] = field(default_factory=_default_act_cfg)
    fold_bn: bool = True
    w_reduce_range: bool = False

    def __post_init__(self) -> None:
        _check_bits('w_bits', self.w_bits, W_BITS_RANGE)
        _check_bits('a_bits', self.a_bits, A_BITS_RANGE)
        if self.first_layer_bits is not None:
            _check_bits('first_layer_bits', self.first_layer_bits, W_BITS_RANGE)
        if self.first_layer is not None and not isinstance(self.first_layer, str):
            raise ValueError(f"first_layer={self.first_layer!r} is invalid; allowed 'auto', "
                             'a module name or None')
        self.fp_layers = _check_patterns('fp_layers', self.fp_layers)
        self.final_layers = _check_patterns('final_layers', self.final_layers)
        for name in ('quantize_final', 'fold_bn', 'w_reduce_range'):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f'{name}={getattr(self, name)!r} is invalid; allowed True/False')
        self._check_overrides()
        self.weight = self._check_quantizer_cfg('weight', self.weight, self.w_bits)
        self.act = self._check_quantizer_cfg('act', self.act, self.a_bits)
        if self.w_reduce_range:
            try:
                self._check_quantizer_cfg('weight', dict(self.weight, **_REDUCED), REDUCED_BITS)
            except ValueError as err:
                raise ValueError(f"w_reduce_range=True needs weight=dict(type='Uniform', ...) "
                                 f'(it sets {_REDUCED} at {REDUCED_BITS} bits); {err}') from None

    def _check_overrides(self) -> None:
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f'overrides={self.overrides!r} must be a dict regex -> '
                             "{'w_bits': .., 'a_bits': ..}")
        self.overrides = {k: dict(v) if isinstance(v, Mapping) else v
                          for k, v in self.overrides.items()}
        for pattern, bits in self.overrides.items():
            _check_regex('overrides', pattern)
            if not isinstance(bits, dict) or not bits or set(bits) - set(_OVERRIDE_KEYS):
                raise ValueError(f'overrides[{pattern!r}]={bits!r} is invalid; allowed keys '
                                 f'{sorted(_OVERRIDE_KEYS)}')
            for key, value in bits.items():
                _check_bits(f'overrides[{pattern!r}].{key}', value, _OVERRIDE_KEYS[key])

    @staticmethod
    def _check_quantizer_cfg(name: str, cfg: Any, bits: int) -> dict[str, Any]:
        if not isinstance(cfg, Mapping) or 'type' not in cfg:
            raise ValueError(f"{name}={cfg!r} must be a quantizer config dict with a 'type'; "
                             f'allowed types: {sorted(QUANTIZERS.module_dict)}')
        cfg = dict(cfg)
        if 'bits' in cfg:
            raise ValueError(f"{name}: 'bits' is set per layer from w_bits/a_bits; remove it")
        try:  # build once so that bad options fail now, not in the middle of a conversion
            build_from(QUANTIZERS, dict(cfg, bits=bits), name)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f'{name}={cfg!r} is invalid: {err}') from None
        return cfg

    @classmethod
    def from_cfg(cls, cfg: QuantPolicy | Mapping[str, Any] | None) -> QuantPolicy:
        """Build from the hook's ``quant=dict(...)``; an object passes through.

        The one place that knows the policy's fields and defaults: the engine and the hook
        call it (``engine.build_policy``).

        Raises:
            UnknownFieldError: an unknown field (a ``KeyError`` and a ``ValueError``; the
                message lists the allowed fields).
            ValueError: a bad value (the message names the field and the allowed values).
        """
        if isinstance(cfg, cls):
            return cfg
        if cfg is not None and not isinstance(cfg, Mapping):
            raise ValueError(f'quant={cfg!r} must be a dict of policy fields')
        cfg = dict(cfg or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(allowed))
        if unknown:
            raise UnknownFieldError(f'quant: unknown field(s) {unknown}; allowed: {allowed}')
        return cls(**cfg)

    # ------------------------------------------------------------------ per-layer decisions
    def fp_reason(self, name: str) -> str | None:
        """Why layer ``name`` stays FP (``'fp_layers'`` / ``'final_layers'``) or ``None``."""
        if any(re.fullmatch(p, name) for p in self.fp_layers):
            return 'fp_layers'
        if not self.quantize_final and any(re.fullmatch(p, name) for p in self.final_layers):
            return 'final_layers'
        return None

    def bits_for(self, name: str, *, is_first: bool = False) -> tuple[int, int]:
        """``(w_bits, a_bits)`` of layer ``name``: defaults, first-layer rule, overrides."""
        w_bits, a_bits = self.w_bits, self.a_bits
        if is_first and self.first_layer_bits is not None:
            w_bits = a_bits = self.first_layer_bits
        for pattern, bits in self.overrides.items():
            if re.fullmatch(pattern, name):
                return bits.get('w_bits', w_bits), bits.get('a_bits', a_bits)
        return w_bits, a_bits

    def weight_cfg(self, w_bits: int) -> dict[str, Any]:
        """Weight quantizer config of a layer with ``w_bits``-bit weights (``bits`` added;
        ``w_reduce_range`` narrows 8-bit grids to ``-64..64``)."""
        cfg = dict(self.weight, bits=w_bits)
        if self.w_reduce_range and w_bits == REDUCED_BITS:
            cfg.update(_REDUCED)
        return cfg

    def patterns(self) -> dict[str, list[str]]:
        """Every regex of the policy by field (used to report patterns matching nothing)."""
        return {'fp_layers': self.fp_layers, 'final_layers': self.final_layers,
                'overrides': list(self.overrides)}
