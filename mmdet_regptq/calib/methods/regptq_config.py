"""Options of :class:`~mmdet_regptq.calib.methods.regptq.RegPTQ`, grouped by what they set.

``RegPTQ(fgic=..., llaq=..., schedule=..., experimental=...)`` takes each group as its
dataclass or as a plain dict of its fields (configs are dicts). Every group checks its
fields on construction and names the bad field and the allowed values. The defaults live
here and nowhere else.

- ``fgic`` (:class:`~mmdet_regptq.calib.fgic.FGICConfig`): the filtered global loss ``L_G``.
- ``llaq`` (:class:`LLAQConfig`): which layers get the log-affine quantizer, how it trains.
- ``schedule`` (:class:`ScheduleConfig`): the scale-search init and the terms of each
  unit's loss (``L_H`` Fisher-weighted, ``L_G`` on every n-th iteration).
- ``experimental`` (:class:`ExperimentalConfig`): options beyond the paper whose value is
  still being measured (``docs/``); their names and defaults may change.

The flat keyword spellings of earlier releases (``RegPTQ(theta_c=1e-3, llaq='head')``) are
refused with a :class:`RenamedOptionError` that names the grouped spelling of each
(:data:`FLAT_OPTIONS`), so a config written for them fails at load instead of running with
a changed meaning.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence, TypeVar

from ...errors import UnknownFieldError
from ...quant.quantizers import RANGE_METHODS
from ...quant.quantizers.llaq import SEARCH_K
from ..fgic import FGICConfig
from ..reconstruct import check_local_draw

__all__ = ['LLAQConfig', 'ScheduleConfig', 'ExperimentalConfig', 'RegPTQConfig',
           'FGICConfig', 'FLAT_OPTIONS', 'RenamedOptionError', 'LLAQ_TARGETS', 'LLAQ_ROUNDING',
           'AUTO_LEARNED_MAX_BITS']

#: ``llaq.target`` → the :class:`LLAQConfig` field holding the target layer regexes.
LLAQ_TARGETS = {'reg': 'reg_layers', 'head': 'head_layers'}
#: ``experimental.llaq_rounding`` → registered quantizer type of the LLAQ layers
#: (``'auto'``: one of the two by the layer's weight bits, :data:`AUTO_LEARNED_MAX_BITS`).
LLAQ_ROUNDING = {'psi': 'LLAQ', 'learned': 'LLAQRound', 'auto': None}
#: ``llaq_rounding='auto'``: learned rounding at these weight bits and below, ``psi`` above
#: (chosen on held-out val images 100-299 of the bundled detectors, docs/usage.md).
AUTO_LEARNED_MAX_BITS = 2


def _fail(message: str) -> None:
    raise ValueError(message)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(f'{name}={value!r} is invalid; allowed True/False')


def _check_number(name: str, value: Any, low: float, *, above: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and (value > low if above else value >= low))
    if not ok:
        _fail(f'{name}={value!r} must be a number {">" if above else ">="} {low}')


def _check_count(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(f'{name}={value!r} must be an int >= {low}')


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        _fail(f'{name}={value!r} is unknown; allowed: {list(allowed)}')


def _regexes(name: str, patterns: Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        _fail(f'{name}={patterns!r} must be a list of regex strings')
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            _fail(f'{name}: {pattern!r} is not a valid regex ({err})')
    return list(patterns)


@dataclass(frozen=True)
class LLAQConfig:
    """Where LLAQ (the learnable log-affine weight quantizer) goes and how it trains.

    Attributes:
        target: ``'reg'`` (the head's regression branch, the paper), ``'head'`` (every
            head layer) or ``None`` (off: uniform grids + AdaRound everywhere).
        head_layers: regexes (``re.fullmatch`` on module names) of the head's layers;
            ``None``: the detector adapter's (filled in by the engine).
        reg_layers: regexes of the regression branch; ``None``: the adapter's.
        lr: Adam lr of LLAQ's ``k`` / ``a`` (our choice 1e-3, cosine-annealed).
        quantizer: options of the LLAQ quantizer (``QUANTIZERS['LLAQ']``); ``type`` and
            ``bits`` are set per layer. A given dict replaces the default whole. Default
            ``k_candidates=SEARCH_K`` (a search over ``k``; the paper's ``k = 1`` init is
            ``dict(k_candidates=(1.0,))``); ``dict(power_of_two=True)`` keeps ``k = 1`` so
            every level is a power of two (deployed as shifts, docs/deploy.md).
    """

    target: str | None = 'reg'
    head_layers: list[str] | None = None
    reg_layers: list[str] | None = None
    lr: float = 1e-3
    quantizer: dict[str, Any] = field(default_factory=lambda: {'k_candidates': SEARCH_K})

    def __post_init__(self) -> None:
        _check_choice('target', self.target, [*LLAQ_TARGETS, None])
        for name in ('head_layers', 'reg_layers'):
            object.__setattr__(self, name, _regexes(name, getattr(self, name)))
        _check_number('lr', self.lr, 0)
        if not isinstance(self.quantizer, Mapping):
            _fail(f'quantizer={self.quantizer!r} must be a dict of LLAQ quantizer options')
        object.__setattr__(self, 'quantizer', dict(self.quantizer))
        for key in ('type', 'bits'):
            if key in self.quantizer:
                _fail(f'quantizer: {key!r} is set by the method; remove it')

    def patterns(self) -> list[str] | None:
        """The regexes of :attr:`target` (``[]`` when LLAQ is off, ``None`` when unknown)."""
        return [] if self.target is None else getattr(self, LLAQ_TARGETS[self.target])


@dataclass(frozen=True)
class ScheduleConfig:
    """The steps of Reg-PTQ: the scale init, then the loss terms that train each unit.

    Attributes:
        global_loss: add the global loss ``L_G`` (FGIC) to every unit's loss.
        fisher: weight the local reconstruction ``L_H`` by the squared gradients of
            ``L_G`` (diagonal Fisher); ``False``: plain output MSE.
        global_interval: compute ``L_G`` on every n-th iteration only (1: every one, as
            in the paper); the tail forward + backward is most of Reg-PTQ's time. The
            default was chosen on held-out images (docs/usage.md).
        init_scale_method: range method of every uniform quantizer before calibration
            (``RANGE_METHODS``; ``'lp'``: the Lp search, re-run only where another method was
            configured; ``None``: keep the policy's).
        init_p: exponent of the ``'lp'`` search (2.4).
        max_tail_units: depth bound (``None``: off, every unit runs its own tails). A unit
            with more than this many units after it (a *far* unit) runs no tail forward of
            its own: no ``L_G`` term, and its Fisher weights come from one pass shared by
            ``max_tail_units`` consecutive far units (``experimental.fisher_share``'s
            mechanism). The units closer to the output run as without the bound. Averaged
            over a group, a far unit's Fisher pass is ``1 / max_tail_units`` of a pass over
            the network after it, so a unit costs on average at most about
            ``max(max_tail_units, num_units / max_tail_units)`` units' forward + backward
            instead of up to ``num_units``.
    """

    global_loss: bool = True
    fisher: bool = True
    global_interval: int = 32
    init_scale_method: str | None = 'lp'
    init_p: float = 2.4
    max_tail_units: int | None = None

    def __post_init__(self) -> None:
        _check_bool('global_loss', self.global_loss)
        _check_bool('fisher', self.fisher)
        _check_count('global_interval', self.global_interval, 1)
        _check_choice('init_scale_method', self.init_scale_method, [*RANGE_METHODS, None])
        _check_number('init_p', self.init_p, 0, above=True)
        if self.max_tail_units is not None:
            if isinstance(self.max_tail_units, bool) or not isinstance(
                    self.max_tail_units, int) or self.max_tail_units < 1:
                _fail(f'max_tail_units={self.max_tail_units!r} is invalid; allowed None (no '
                      'bound) or an int >= 1')


@dataclass(frozen=True)
class ExperimentalConfig:
    """Options beyond the paper, still being measured: names and defaults may change.

    Attributes:
        llaq_rounding: ``'psi'`` (the paper: each weight rounds to the nearest level of
            ``psi``, straight-through), ``'learned'`` (``'LLAQRound'``: AdaRound's per-weight
            choice between the two neighbouring log levels, trained with the unit and
            hardened at its end) or ``'auto'`` (``'learned'`` on layers with at most
            :data:`AUTO_LEARNED_MAX_BITS` weight bits, ``'psi'`` on the others).
        global_weight: factor of ``L_G`` in the total loss (the paper's plain sum: 1).
        fisher_share: the Fisher weights of this many consecutive units come from one
            tail forward + backward per batch (1: the paper's per-unit ``dL_G / dO^k``).
        local_draw: what the iterations without ``L_G`` reconstruct from: ``'batch'``
            (all of a calibration batch's calls of the unit) or ``'call'`` (one cached call,
            as QDrop draws).
    """

    llaq_rounding: str = 'auto'
    global_weight: float = 1.0
    fisher_share: int = 1
    local_draw: str = 'batch'

    def __post_init__(self) -> None:
        _check_choice('llaq_rounding', self.llaq_rounding, list(LLAQ_ROUNDING))
        _check_number('global_weight', self.global_weight, 0)
        _check_count('fisher_share', self.fisher_share, 1)
        check_local_draw(self.local_draw)


_GROUPS: dict[str, type] = {'fgic': FGICConfig, 'llaq': LLAQConfig,
                            'schedule': ScheduleConfig, 'experimental': ExperimentalConfig}

#: flat keyword spelling → ``(group, field)`` it maps onto.
FLAT_OPTIONS: dict[str, tuple[str, str]] = {
    **{name: ('fgic', name) for name in ('lambda_', 'p', 'theta_c', 'theta_i', 'conf_filter',
                                         'iou_filter', 'normalize_boxes', 'entropy_offset')},
    'llaq': ('llaq', 'target'), 'head_layers': ('llaq', 'head_layers'),
    'reg_layers': ('llaq', 'reg_layers'), 'lr_llaq': ('llaq', 'lr'),
    'llaq_cfg': ('llaq', 'quantizer'),
    **{name: ('schedule', name) for name in ('global_loss', 'fisher', 'global_interval',
                                             'init_scale_method', 'init_p')},
    **{name: ('experimental', name) for name in ('llaq_rounding', 'global_weight',
                                                 'fisher_share', 'local_draw')},
}

T = TypeVar('T')


class RenamedOptionError(ValueError):
    """A flat Reg-PTQ option of earlier releases; the message names its grouped spelling."""

    def __init__(self, flat: Mapping[str, Any]) -> None:
        moved = []
        for old, value in flat.items():
            group, name = FLAT_OPTIONS[old]
            if old == 'llaq':
                value = 'reg' if value is True else None if value is False else value
            moved.append(f'{old}= -> {group}=dict({name}={value!r})')
        super().__init__('RegPTQ: option(s) renamed; write ' + ', '.join(moved))




def build_group(cls: type[T], value: T | Mapping[str, Any] | None, group: str) -> T:
    """``cls`` from a dict of its fields (or ``None``: the defaults); an instance passes
    through. Errors are ``ValueError`` naming ``group`` and the field."""
    if isinstance(value, cls):
        return value
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f'RegPTQ {group}={value!r} must be a {cls.__name__} or a dict of '
                         f'its fields')
    value = dict(value or {})
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise UnknownFieldError(f'RegPTQ {group}: unknown field(s) {unknown}; allowed: '
                                f'{allowed}')
    try:
        return cls(**value)
    except (TypeError, ValueError) as err:   # TypeError: a wrongly typed value compared
        raise ValueError(f'RegPTQ {group}: {err}') from None


@dataclass(frozen=True)
class RegPTQConfig:
    """Every Reg-PTQ option, by group (see the module docstring)."""

    fgic: FGICConfig = field(default_factory=FGICConfig)
    llaq: LLAQConfig = field(default_factory=LLAQConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    experimental: ExperimentalConfig = field(default_factory=ExperimentalConfig)

    @classmethod
    def build(cls, **groups: Any) -> RegPTQConfig:
        """From the groups, each a dataclass, a dict of its fields or ``None`` (defaults).

        Raises:
            RenamedOptionError: a flat spelling (:data:`FLAT_OPTIONS`) was given, or
                ``llaq`` as a bool / string (the flat spelling of ``llaq.target``).
            UnknownFieldError: a name that is neither a group nor a flat spelling.
        """
        flat = {name: groups.pop(name) for name in list(groups)
                if name in FLAT_OPTIONS and (name != 'llaq'
                                             or isinstance(groups[name], (bool, str)))}
        if flat:
            raise RenamedOptionError(flat)
        unknown = sorted(set(groups) - set(_GROUPS))
        if unknown:
            raise UnknownFieldError(f'RegPTQ: unknown option group(s) {unknown}; allowed: '
                                    f'{list(_GROUPS)}')
        return cls(**{name: build_group(group, groups.get(name), name)
                      for name, group in _GROUPS.items()})

    def as_flat(self) -> dict[str, Any]:
        """Every option under its flat spelling (:data:`FLAT_OPTIONS`; ``llaq`` is the
        target, ``False`` when off): what logs and comparisons read."""
        out = {old: getattr(getattr(self, group), name)
               for old, (group, name) in FLAT_OPTIONS.items()}
        out['llaq'] = False if out['llaq'] is None else out['llaq']
        return out
