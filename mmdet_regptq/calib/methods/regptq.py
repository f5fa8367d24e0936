"""Reg-PTQ (Ding et al., CVPR 2024): LLAQ on the head's regression branch + FGIC."""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Iterable, Sequence

from mmengine.logging import MMLogger
from torch import Tensor, nn

from ...quant import LLAQuantizer, UniformQuantizer, iter_quant_modules
from ...registry import PTQ_METHODS, QUANTIZERS, build_from
from ..capture import GradLoss
from ..fgic import FGICConfig, GlobalLoss
from ..losses import FisherMSE, OutputMSE, ReconLoss
from ..reconstruct import OptimGroup, ReconStats
from ..trace import ForwardFn
from ..units import ReconUnit
from .base import UnitCallback
from .qdrop import QDrop
from .regptq_config import (AUTO_LEARNED_MAX_BITS, FLAT_OPTIONS, LLAQ_ROUNDING, LLAQ_TARGETS,
                            ExperimentalConfig, LLAQConfig, RegPTQConfig, ScheduleConfig)

__all__ = ['RegPTQ', 'LLAQ_TARGETS', 'LLAQ_ROUNDING', 'AUTO_LEARNED_MAX_BITS']


@PTQ_METHODS.register_module()
class RegPTQ(QDrop):
    """Reg-PTQ: scale-search init → LLAQ on the head's regression branch → FGIC.

    QDrop's pipeline (drop 0.5 with FP input mixing, AdaRound rounding for uniform layers,
    LSQ activation steps), block-wise inside ``block_scopes`` (the backbone) and layer-wise
    elsewhere. Per unit ``k`` the loss is ``L_H^k + L_G``: ``L_H`` the diagonal-Fisher
    weighted reconstruction error with ``dL_G / dO^k`` captured before the unit trains,
    ``L_G`` the filtered global loss on the detector's decoded predictions, computed by a
    :class:`TailRunner` forward of the network after the unit (later units FP). The global
    term's cost is logged per unit.

    The options come in groups (:mod:`.regptq_config`); each is its dataclass or a dict of
    its fields, validated here.

    Args:
        fgic: :class:`FGICConfig`, the global loss ``L_G``: filter thresholds ``theta_c`` /
            ``theta_i``, weight ``lambda_`` and exponent ``p`` of the box term.
        llaq: :class:`LLAQConfig`, which layers get LLAQ (``target``; the engine fills the
            layer regexes from the detector adapter), its quantizer options and lr.
        schedule: :class:`ScheduleConfig`, the scale-search init and the terms of each
            unit's loss (``global_loss``, ``fisher``, ``global_interval``).
        experimental: :class:`ExperimentalConfig`, options beyond the paper that are still
            being measured (``llaq_rounding``, ``global_weight``, ``fisher_share``,
            ``local_draw``).
        **kwargs: see :class:`QDrop` / :class:`PTQMethod`. The flat spellings of the
            group fields of earlier releases (``theta_c=...``, ``llaq='head'``) raise
            :class:`~.regptq_config.RenamedOptionError` naming the grouped spelling.
    """

    legacy_options = {old: f'{group}.{name}' for old, (group, name) in FLAT_OPTIONS.items()}

    def __init__(self, *, fgic: FGICConfig | dict | None = None,
                 llaq: LLAQConfig | dict | bool | str | None = None,
                 schedule: ScheduleConfig | dict | None = None,
                 experimental: ExperimentalConfig | dict | None = None,
                 **kwargs: Any) -> None:
        flat = {name: kwargs.pop(name) for name in list(kwargs) if name in FLAT_OPTIONS}
        config = RegPTQConfig.build(fgic=fgic, llaq=llaq, schedule=schedule,
                                    experimental=experimental, **flat)
        super().__init__(**kwargs)
        self.fgic: FGICConfig = config.fgic
        self.llaq: LLAQConfig = config.llaq
        self.schedule: ScheduleConfig = config.schedule
        self.experimental: ExperimentalConfig = config.experimental
        self._check_llaq_quantizer()
        # the reconstruction loop's settings (PTQMethod attributes) from the groups
        self.tail_interval = self.schedule.global_interval
        self.fisher_share = self.experimental.fisher_share
        self.max_tail_units = self.schedule.max_tail_units
        self.local_draw = self.experimental.local_draw
        self._global_term: GlobalLoss | None = None

    @property
    def config(self) -> RegPTQConfig:
        """Every option, by group."""
        return RegPTQConfig(self.fgic, self.llaq, self.schedule, self.experimental)

    def _check_llaq_quantizer(self) -> None:
        """Build each LLAQ quantizer type the config can use once: bad ``llaq.quantizer``
        options fail now, not when the first LLAQ layer is swapped."""
        rounding = self.experimental.llaq_rounding
        types = ['LLAQ', 'LLAQRound'] if rounding == 'auto' else [LLAQ_ROUNDING[rounding]]
        for name in types:
            try:
                build_from(QUANTIZERS, dict(self.llaq.quantizer, type=name, bits=4),
                           'llaq.quantizer')
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f'RegPTQ llaq: quantizer={self.llaq.quantizer!r} is invalid '
                                 f'for {name!r}: {err}') from None

    # ------------------------------------------------------------------ layer selection
    def set_layer_defaults(self, *, head: Sequence[str], regression: Sequence[str]) -> None:
        """Fill ``llaq.head_layers`` / ``llaq.reg_layers`` that were not given."""
        llaq = self.llaq
        self.llaq = dataclasses.replace(
            llaq, head_layers=head if llaq.head_layers is None else llaq.head_layers,
            reg_layers=regression if llaq.reg_layers is None else llaq.reg_layers)

    def llaq_patterns(self) -> list[str]:
        """Regexes of the layers that get LLAQ weight quantizers (``[]`` when off)."""
        patterns = self.llaq.patterns()
        if patterns is None:
            field = LLAQ_TARGETS[self.llaq.target]
            raise ValueError(f'RegPTQ llaq.target={self.llaq.target!r} needs llaq.{field}='
                             '[regex, ...]: the engine fills it from the detector adapter; '
                             'pass it when calling calibrate() directly, or set '
                             'llaq.target=None')
        return patterns

    def install_llaq(self, model: nn.Module) -> list[str]:
        """Swap the weight quantizers of the LLAQ target layers for initialised LLAQ ones.

        Returns:
            The names of the layers that got LLAQ (already-LLAQ layers included).
        """
        patterns = self.llaq_patterns()
        done = []
        for name, layer in iter_quant_modules(model):
            if not any(re.fullmatch(p, name) for p in patterns):
                continue
            if not any(isinstance(q, LLAQuantizer) for q in layer.weight_quantizers().values()):
                layer.replace_weight_quantizer(self._llaq_factory)
            done.append(name)
        if patterns and not done:
            MMLogger.get_current_instance().warning(
                f'RegPTQ: llaq.target={self.llaq.target!r} patterns {patterns} match no '
                'quantized layer; '
                'every layer keeps its uniform quantizer')
        return done

    def _llaq_factory(self, old: nn.Module, weight: Tensor) -> nn.Module:
        if isinstance(old, LLAQuantizer):
            return old
        q = build_from(QUANTIZERS, dict(self.llaq.quantizer, type=self.llaq_type(old.bits),
                                        bits=old.bits, name=old.name), 'llaq.quantizer')
        q.to(weight.device)
        q.init_from(weight)
        return q

    def llaq_type(self, bits: int) -> str:
        """Registered quantizer type of an LLAQ layer with ``bits`` weight bits."""
        rounding = self.experimental.llaq_rounding
        if rounding == 'auto':
            return 'LLAQRound' if bits <= AUTO_LEARNED_MAX_BITS else 'LLAQ'
        return LLAQ_ROUNDING[rounding]

    def _adaround_factory(self, base: nn.Module, weight: Tensor) -> nn.Module:
        if isinstance(base, LLAQuantizer):  # LLAQ rounds with its own straight-through psi
            return base
        return super()._adaround_factory(base, weight)

    # ------------------------------------------------------------------ engine interface
    def global_loss_config(self) -> FGICConfig | None:
        """FGIC's options when ``L_G`` or the Fisher weights of ``L_H`` use it."""
        return self.fgic if self.schedule.global_loss or self.schedule.fisher else None

    def prepare_model(self, model: nn.Module) -> None:
        """LLAQ on the target layers: their quantizer state is in a saved checkpoint."""
        self.install_llaq(model)

    # ------------------------------------------------------------------ configuration
    def needs_fisher(self) -> bool:
        return self.schedule.fisher

    def prepare_unit(self, unit: ReconUnit) -> list[OptimGroup]:
        groups = super().prepare_unit(unit)
        llaq = [p for _, layer in unit.layers for q in layer.weight_quantizers().values()
                if isinstance(q, LLAQuantizer) for p in q.trainable_parameters()]
        if llaq and self.llaq.lr > 0:
            groups.append(OptimGroup('llaq', llaq, self.llaq.lr, cosine=True))
        return groups

    def losses(self, unit: ReconUnit, *, output_fn: Callable[[Any], Tensor] | None,
               global_loss: GradLoss | None) -> list[ReconLoss]:
        terms = super().losses(unit, output_fn=output_fn, global_loss=global_loss)
        if self.schedule.fisher:
            terms = [FisherMSE() if isinstance(t, OutputMSE) else t for t in terms]
        self._global_term = None
        if self.schedule.global_loss:
            if global_loss is None:
                raise ValueError(_NEEDS_GLOBAL)
            self._global_term = GlobalLoss(loss_fn=global_loss,
                                           weight=self.experimental.global_weight)
            terms.append(self._global_term)
        return terms

    def restore_finished(self, model: nn.Module, units: Sequence[ReconUnit],
                         num_finished: int) -> None:
        """Also installs LLAQ on every target layer, so a partial checkpoint loads."""
        self.prepare_model(model)
        super().restore_finished(model, units, num_finished)

    # ------------------------------------------------------------------ steps
    def init_scales(self, model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn,
                    seed: int = 0) -> None:
        """Lp scale search of the uniform quantizers, LLAQ install, activation scales."""
        if self.schedule.init_scale_method is not None:
            _research_uniform(model, self.schedule.init_scale_method, self.schedule.init_p)
        names = self.install_llaq(model)
        MMLogger.get_current_instance().info(f'RegPTQ: LLAQ ({self.llaq.target}) on '
                                             f'{len(names)} layers: {names}')
        super().init_scales(model, batches, forward_fn, seed=seed)

    def calibrate(self, model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn, *,
                  output_fn: Callable[[Any], Tensor] | None = None,
                  global_loss: GradLoss | None = None, logger: logging.Logger | None = None,
                  on_unit_end: UnitCallback | None = None, start_unit: int = 0,
                  seed: int = 0, tail_fn: ForwardFn | None = None) -> list[ReconStats]:
        """See :meth:`PTQMethod.calibrate`; ``global_loss`` is the FGIC callable."""
        logger = logger or MMLogger.get_current_instance()
        if self.schedule.global_loss and global_loss is None:
            raise ValueError(_NEEDS_GLOBAL)
        if start_unit == 0:
            self.llaq_patterns()  # fail before any work when the targets are unknown
        totals = {'tail': 0.0, 'loss': 0.0, 'seconds': 0.0}

        def unit_end(k: int, unit: ReconUnit, stats: ReconStats) -> None:
            term = self._global_term
            if term is not None and (stats.tail_share > 0 or term.seconds > 0):
                totals['tail'] += stats.tail_share * stats.seconds
                totals['loss'] += term.seconds
                totals['seconds'] += stats.seconds
                logger.info(f'RegPTQ {unit.name}: global term = tail forwards '
                            f'{stats.tail_share:.0%} of the loop + decode/FGIC '
                            f'{term.seconds:.2f}s of {stats.seconds:.2f}s')
            if on_unit_end is not None:
                on_unit_end(k, unit, stats)

        stats = super().calibrate(model, batches, forward_fn, output_fn=output_fn,
                                  global_loss=global_loss, logger=logger,
                                  on_unit_end=unit_end, start_unit=start_unit, seed=seed,
                                  tail_fn=tail_fn)
        if totals['seconds'] > 0:
            share = (totals['tail'] + totals['loss']) / totals['seconds']
            logger.info(f'RegPTQ: the global term took about {share:.0%} of '
                        f'{totals["seconds"]:.1f}s of reconstruction')
        return stats


_NEEDS_GLOBAL = ('RegPTQ schedule.global_loss=True needs calibrate(global_loss=...): the '
                 'FGIC callable built by the detector adapter (adapter.global_loss(method.fgic)); '
                 'or set schedule=dict(global_loss=False)')


def _research_uniform(model: nn.Module, method: str, p: float) -> None:
    """Set ``scale_method`` / ``p`` of every uniform quantizer; re-initialise the weight
    quantizers whose setting changed (activations are initialised afterwards anyway)."""
    for _, layer in iter_quant_modules(model):
        weights = layer.weight_quantizers()
        for slot, q in [*weights.items(), *layer.input_quantizers().items()]:
            if not isinstance(q, UniformQuantizer):
                continue
            changed = q.scale_method != method or (method == 'lp' and q.p != p)
            q.scale_method, q.p = method, (p if method == 'lp' else q.p)
            if changed and weights.get(slot) is q:
                q.init_from(layer.float_weight(slot).detach())
