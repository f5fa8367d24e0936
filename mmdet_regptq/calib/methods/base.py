"""``PTQMethod``: the common calibration driver; each method is a small configuration of it.

``calibrate`` steps: find the units, initialise the activation scales, then per unit:
capture → switch the unit on → reconstruct → callback. Methods differ in the units
(block-wise or layer-wise), the trained parameters (:meth:`PTQMethod.param_groups`), the
loss terms (:meth:`PTQMethod.losses`) and the drop settings.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Mapping, Sequence

from mmengine.logging import MMLogger
from mmengine.utils import ProgressBar
from torch import Tensor, nn

from ...quant import (AdaRoundQuantizer, eval_mode, init_activation_quantizers,
                      set_quant_state)
from ..cache import GiB, ActivationCache
from ...errors import UnknownFieldError
from ...registry import PTQ_METHODS, build_from
from ..capture import GradLoss, capture_unit, output_mse
from .. import dist as calib_dist
from ..fgic import FGICConfig
from ..losses import FisherMSE, OutputMSE, ReconLoss, RoundingRegularizer
from ..reconstruct import OptimGroup, ReconStats, reconstruct, rounding_quantizers
from ..tail import TailRunner
from ..trace import ForwardFn
from ..units import ReconUnit, find_units

#: ``on_unit_end(unit_index, unit, stats)``, e.g. the engine's checkpoint for resume.
UnitCallback = Callable[[int, ReconUnit, ReconStats], None]


def _check(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f'{name}={value!r} is out of range; allowed {lo}..{hi}')


def check_int(name: str, value: Any, low: int) -> None:
    """A count option: an int (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f'{name}={value!r} must be an int >= {low}')


def act_scale_params(unit: ReconUnit) -> list[nn.Parameter]:
    """LSQ step sizes (``scale`` parameters) of the unit's input quantizers."""
    params = []
    for _, layer in unit.layers:
        for q in layer.input_quantizers().values():
            scale = getattr(q, 'scale', None)
            if isinstance(scale, nn.Parameter):
                params.append(scale)
    return params


class PTQMethod:
    """Base of the PTQ methods (registered in ``PTQ_METHODS``).

    Args:
        iters: reconstruction iterations per unit (paper: 2000).
        warmup: share of iterations before the rounding regulariser and beta decay start.
        round_weight: weight of the rounding regulariser (0.01).
        beta: AdaRound temperature ``(start, end)`` (20, 2).
        lr_alpha: Adam lr of AdaRound's rounding variables (1e-3).
        lr_act: Adam lr of LSQ activation step sizes, cosine-annealed to 0 (4e-5).
        lr_weight: Adam lr of weights/biases for methods that learn them (AdaQuant, 1e-5).
        learn_act: train the activation step sizes of the unit's inputs.
        drop_prob: QDrop's drop probability of the unit's wrappers while training.
        fp_input_prob: QDrop's mixing of FP unit inputs (``None`` = ``drop_prob``).
        block_scopes: module-name prefixes whose residual blocks are units (``()`` =
            layer-wise everywhere).
        zeta: AdaRound stretch (1.1).
        gamma: AdaRound stretch (-0.1).
        cache_max_bytes: in-memory cap of each activation cache before spilling to disk.
        spill_dir: parent directory of the spill files (``None`` = system temp dir).
        log_interval: log the loss terms every this many iterations (0 = never).
        progress: show a progress bar over the units.
    """

    #: whether the method trains anything (MinMax / MSE only set scales)
    trains: ClassVar[bool] = True
    #: whether the weight quantizers are swapped for AdaRound ones
    adaround: ClassVar[bool] = True
    #: flat spellings of earlier releases, refused with their new spelling → the new spelling
    legacy_options: ClassVar[Mapping[str, str]] = {}

    def __init__(self, *, iters: int = 2000, warmup: float = 0.2, round_weight: float = 0.01,
                 beta: Sequence[float] = (20.0, 2.0), lr_alpha: float = 1e-3,
                 lr_act: float = 4e-5, lr_weight: float = 1e-5, learn_act: bool = True,
                 drop_prob: float = 0.0, fp_input_prob: float | None = None,
                 block_scopes: Sequence[str] = ('backbone',), zeta: float = 1.1,
                 gamma: float = -0.1, cache_max_bytes: int = 2 * GiB,
                 spill_dir: str | None = None, log_interval: int = 500,
                 progress: bool = True) -> None:
        check_int('iters', iters, 0)
        _check('warmup', warmup, 0.0, 0.999)
        _check('drop_prob', drop_prob, 0.0, 1.0)
        fp_input_prob = drop_prob if fp_input_prob is None else fp_input_prob
        _check('fp_input_prob', fp_input_prob, 0.0, 1.0)
        for name, lr in (('lr_alpha', lr_alpha), ('lr_act', lr_act), ('lr_weight', lr_weight)):
            _check(name, lr, 0.0, float('inf'))
        if len(beta) != 2:
            raise ValueError(f'beta={beta!r} must be (start, end)')
        if isinstance(block_scopes, str):
            raise ValueError(f'block_scopes={block_scopes!r} must be a list of names')
        self.iters = iters
        #: run the tail (global-loss terms) on every n-th iteration (methods that use one)
        self.tail_interval = 1
        #: Fisher gradients of this many consecutive units from one pass (methods with them)
        self.fisher_share = 1
        #: depth bound: units with more units after them run no tail of their own
        #: (:func:`is_far`; ``None``: off)
        self.max_tail_units: int | None = None
        #: what the iterations without the tail draw (``reconstruct(local_draw=...)``)
        self.local_draw = 'batch'
        self.warmup = warmup
        self.round_weight = round_weight
        self.beta = (float(beta[0]), float(beta[1]))
        self.lr_alpha, self.lr_act, self.lr_weight = lr_alpha, lr_act, lr_weight
        self.learn_act = learn_act
        self.drop_prob = drop_prob
        self.fp_input_prob = fp_input_prob
        self.block_scopes = tuple(block_scopes)
        self.zeta, self.gamma = zeta, gamma
        self.cache_max_bytes = cache_max_bytes
        self.spill_dir = spill_dir
        self.log_interval = log_interval
        self.progress = progress

    @classmethod
    def options(cls) -> list[str]:
        """The keyword options of the constructor (what a config dict may set besides
        ``type``), collected along the ``**kwargs`` chain of the base classes."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get('__init__')
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            names += [p.name for p in params if p.name != 'self' and p.kind in (
                p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in names]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return names

    # ------------------------------------------------------------------ engine interface
    # What the engine (``quantize_detector``) asks every method; the defaults do nothing.
    def set_layer_defaults(self, *, head: Sequence[str], regression: Sequence[str]) -> None:
        """Layer regexes the detector adapter knows: the head's layers and its regression
        branch. Methods that select layers by role take the ones they were not given."""

    def global_loss_config(self) -> FGICConfig | None:
        """Options of the detector's filtered global loss (FGIC) when the method trains on
        it; the engine then passes ``calibrate(global_loss=...)`` built by the adapter.
        ``None``: the method keeps the default (MSE of the raw outputs, where it needs one)."""
        return None

    def prepare_model(self, model: nn.Module) -> None:
        """Swap in the quantizers whose state a saved (quantized or partial) checkpoint
        holds, before the state is loaded into a freshly quantized ``model``."""

    def set_output_defaults(self, *, sigmoid: bool) -> None:
        """Whether the detector's class scores are independent sigmoids (else a softmax):
        methods with a loss on the class predictions (PD-Quant's KL) take it when not
        given."""

    # ------------------------------------------------------------------ configuration
    def find_units(self, model: nn.Module, forward_fn: ForwardFn, batch: Any
                   ) -> list[ReconUnit]:
        """The method's units (block-wise inside ``block_scopes``)."""
        return find_units(model, forward_fn, batch, block_scopes=self.block_scopes)

    def needs_fisher(self) -> bool:
        """Whether the captured entries need output gradients."""
        return False

    def prepare_unit(self, unit: ReconUnit) -> list[OptimGroup]:
        """Set up the unit's trainable quantizers; returns the optimiser groups."""
        groups = []
        if self.adaround:
            for _, layer in unit.layers:
                if not any(hasattr(q, 'alpha') for q in layer.weight_quantizers().values()
                           if q is not None):
                    layer.replace_weight_quantizer(self._adaround_factory)
            alphas = [q.alpha for q in rounding_quantizers(unit)]
            groups.append(OptimGroup('alpha', alphas, self.lr_alpha))
        if self.learn_act:
            groups.append(OptimGroup('act_scale', act_scale_params(unit), self.lr_act,
                                     cosine=True))
        return groups

    def _adaround_factory(self, base: nn.Module, weight: Tensor) -> nn.Module:
        return AdaRoundQuantizer(base, weight, zeta=self.zeta, gamma=self.gamma)

    def losses(self, unit: ReconUnit, *, output_fn: Callable[[Any], Tensor] | None,
               global_loss: GradLoss | None) -> list[ReconLoss]:
        """Loss terms of the unit's reconstruction."""
        terms: list[ReconLoss] = [OutputMSE()]
        if self.adaround:
            terms.append(RoundingRegularizer(weight=self.round_weight, warmup=self.warmup,
                                             beta=self.beta))
        return terms

    def correct_cache(self, unit: ReconUnit, cache: ActivationCache) -> ActivationCache:
        """The unit's captured entries before reconstruction (PD-Quant corrects the FP
        inputs and targets); returns the cache to reconstruct from."""
        return cache

    def fp_context(self) -> ContextManager:
        """Context active during full-precision passes (AdaQuant restores FP weights)."""
        return contextlib.nullcontext()

    def restore_finished(self, model: nn.Module, units: Sequence[ReconUnit],
                         num_finished: int) -> None:
        """Rebuild the structure of finished units so a partial checkpoint loads.

        Call before ``model.load_state_dict(partial)`` and ``calibrate(start_unit=...)``:
        swaps the weight quantizers of ``units[:num_finished]`` as :meth:`prepare_unit`
        does, and hardens the rounding.
        """
        for unit in units[:num_finished]:
            self.prepare_unit(unit)
            for q in rounding_quantizers(unit):
                q.harden()

    # ------------------------------------------------------------------ steps
    def init_scales(self, model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn,
                    seed: int = 0) -> None:
        """Initialise every input quantizer from calibration forwards (weights quantized)."""
        set_quant_state(model, weight=True, input=True)
        init_activation_quantizers(model, lambda: [forward_fn(model, b) for b in batches],
                                   seed=seed, parallel=calib_dist.observer_sharing())

    def calibrate(self, model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn, *,
                  output_fn: Callable[[Any], Tensor] | None = None,
                  global_loss: GradLoss | None = None, logger: logging.Logger | None = None,
                  on_unit_end: UnitCallback | None = None, start_unit: int = 0,
                  seed: int = 0, tail_fn: ForwardFn | None = None) -> list[ReconStats]:
        """Calibrate a model converted by ``quantize_model``; returns per-unit stats.

        Args:
            model: the quantized model (runs in eval mode here; its modes are restored).
            batches: calibration batches; a Sequence is used as is, another iterable is
                materialised once (batches are accessed by index).
            forward_fn: ``forward_fn(model, batch)`` runs the model, returns raw outputs.
            output_fn: ``output_fn(raw_outputs) -> logits [N, C]`` (PD-Quant).
            global_loss: ``global_loss(fp_outputs, q_outputs) -> scalar`` on raw outputs:
                source of the Fisher gradients (default :func:`output_mse`) and the global
                term of methods that have one.
            logger: defaults to the current MMLogger.
            on_unit_end: called after each unit as ``on_unit_end(index, unit, stats)``.
            start_unit: skip ``units[:start_unit]`` (restored by the caller, see
                :meth:`restore_finished`); activation scales are then not re-initialised.
            seed: unit ``k`` reconstructs with seed ``seed + k``.
            tail_fn: a cheaper ``forward_fn`` whose outputs are all ``global_loss`` and
                ``output_fn`` read (the detector adapter's ``box_forward``); the final-output
                forwards of the units it calls use it (:class:`TailRunner`).

        Returns:
            One :class:`ReconStats` per reconstructed unit (empty for MinMax / MSE).

        Raises:
            ValueError: no batches, or ``start_unit`` out of range.
            RuntimeError: resuming with un-initialised activation quantizers.
        """
        logger = logger or MMLogger.get_current_instance()
        batches = batches if isinstance(batches, Sequence) else list(batches)
        if len(batches) == 0:
            raise ValueError(f'{type(self).__name__}.calibrate: no calibration batches')
        with eval_mode(model):
            units = self.find_units(model, forward_fn, batches[0])
            if not 0 <= start_unit <= len(units):
                raise ValueError(f'start_unit={start_unit} is out of range; allowed '
                                 f'0..{len(units)}')
            logger.info(f'{type(self).__name__}: {len(units)} units '
                        f'({sum(u.kind == "block" for u in units)} blocks), '
                        f'{len(batches)} calibration batches, {self.iters} iters/unit')
            if start_unit == 0:
                self.init_scales(model, batches, forward_fn, seed=seed)
            else:
                _check_initialized(units)
            if not self.trains:
                set_quant_state(model, weight=True, input=True)
                return []
            return self._reconstruct_units(model, units, batches, forward_fn, output_fn,
                                           global_loss, logger, on_unit_end, start_unit,
                                           seed, tail_fn)

    def _reconstruct_units(self, model: nn.Module, units: list[ReconUnit],
                           batches: Sequence[Any], forward_fn: ForwardFn,
                           output_fn: Callable[[Any], Tensor] | None,
                           global_loss: GradLoss | None, logger: logging.Logger,
                           on_unit_end: UnitCallback | None, start_unit: int,
                           seed: int, tail_fn: ForwardFn | None = None) -> list[ReconStats]:
        set_quant_state(model, weight=False, input=False)
        for unit in units[:start_unit]:
            unit.set_quant(True)
        needs_tail = any(t.needs_final_outputs for t in self.losses(
            units[0], output_fn=output_fn, global_loss=global_loss))
        tail = (TailRunner(model, forward_fn, batches, max_bytes=self.cache_max_bytes,
                           spill_dir=self.spill_dir, fp_context=self.fp_context,
                           tail_fn=tail_fn)
                if needs_tail else None)
        grad_loss = (global_loss or output_mse) if self.needs_fisher() else None
        bar = ProgressBar(len(units) - start_unit) if self.progress else None
        all_stats = []
        shared: dict[str, ActivationCache] = {}   # Fisher gradients from an earlier pass
        try:
            for k in range(start_unit, len(units)):
                unit = units[k]
                cache = ActivationCache(max_bytes=self.cache_max_bytes,
                                        spill_dir=self.spill_dir)
                losses = self.losses(unit, output_fn=output_fn, global_loss=global_loss)
                unit_tail, unit_grad_loss = tail, grad_loss
                far = is_far(k, len(units), self.max_tail_units)
                if tail is not None and not tail.reaches_loss(unit):
                    losses = local_only(losses)   # its final-output gradient is zero
                    unit_tail, unit_grad_loss = None, None
                    far = False
                elif far:   # depth bound: no L_G; Fisher weights from a shared pass
                    losses = [t for t in losses if not t.needs_final_outputs]
                if unit_tail is not None:   # the prefix does not depend on unit k's state
                    # only the unit reconstructed last changed since the last prepare: the
                    # stored prefixes (quantized and FP) are extended, not recomputed
                    unit_tail.prepare(unit, reuse=True, fp_prefix=True)
                given = shared.pop(unit.name, None) if unit_grad_loss is not None else None
                share_with = []
                if unit_grad_loss is not None and given is None:
                    group = self.max_tail_units if far else self.fisher_share
                    share_with = [u for i, u in enumerate(units[k + 1:k + group], k + 1)
                                  if (tail is None or tail.reaches_loss(u))
                                  and is_far(i, len(units), self.max_tail_units) == far]
                    shared.update({u.name: ActivationCache(
                        max_bytes=self.cache_max_bytes // len(share_with),
                        spill_dir=self.spill_dir) for u in share_with})
                capture_unit(model, unit, batches, forward_fn, cache,
                             fp_inputs=self.fp_input_prob > 0,
                             grad_loss=unit_grad_loss if given is None else None,
                             fp_context=self.fp_context, tail=unit_tail,
                             share_with=share_with, shared_grads=shared, given_grads=given)
                if given is not None:
                    given.clear()
                cache = self.correct_cache(unit, cache)
                groups = self.prepare_unit(unit)
                unit.set_quant(True)
                stats = reconstruct(
                    unit, cache, iters=self.iters, param_groups=groups,
                    tail=None if far else unit_tail,
                    losses=losses, drop_prob=self.drop_prob, fp_input_prob=self.fp_input_prob,
                    seed=seed + k, log_interval=self.log_interval, logger=logger,
                    tail_interval=self.tail_interval, local_draw=self.local_draw)
                cache.clear()
                all_stats.append(stats)
                tail_note = ('' if tail is None else ', local only' if unit_tail is None
                             else ', far: shared Fisher pass, no L_G' if far
                             else f', tail {stats.tail_share:.0%}')
                logger.info(
                    f'[{k + 1}/{len(units)}] {unit.name} ({unit.kind}, {len(unit.layers)} '
                    f'layers, {unit.num_calls} calls): loss {stats.loss_before:.4g} -> '
                    f'{stats.loss_after:.4g}, {stats.seconds:.1f}s{tail_note}')
                if on_unit_end is not None:
                    on_unit_end(k, unit, stats)
                if bar is not None:
                    bar.update()
        finally:
            if tail is not None:
                tail.release()
            for grads in shared.values():
                grads.clear()
        return all_stats


def build_method(cfg: PTQMethod | Mapping[str, Any]) -> PTQMethod:
    """A PTQ method from its config (``dict(type='RegPTQ', ...)``), validated without a
    model; a built method passes through.

    Raises:
        KeyError: missing or unknown ``type`` (the message lists the registered methods).
        UnknownFieldError: an unknown option (a ``KeyError`` and a ``ValueError``; the
            message lists the allowed ones).
        ValueError: a bad value (the message names the option).
    """
    if isinstance(cfg, PTQMethod):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ValueError(f'method={cfg!r} must be a config dict with a "type" or a PTQMethod')
    name = cfg.get('type')
    cls = PTQ_METHODS.get(name) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, PTQMethod):
        allowed = cls.options()
        unknown = sorted(set(cfg) - {'type', '_scope_'} - set(allowed)
                         - set(cls.legacy_options))
        if unknown:
            close = difflib.get_close_matches(unknown[0], [*allowed, *cls.legacy_options], 1)
            hint = ''
            if close:
                new = cls.legacy_options.get(close[0])
                hint = f'; did you mean {close[0]!r}' + (f' ({new})?' if new else '?')
            raise UnknownFieldError(f'method: unknown option(s) {unknown} for {name}; '
                                    f'allowed: {allowed}{hint}')
    try:
        return build_from(PTQ_METHODS, dict(cfg), 'method')
    except TypeError as err:   # a value of the wrong type inside a constructor
        raise ValueError(f'method: {err}') from None


def is_far(index: int, num_units: int, max_tail_units: int | None) -> bool:
    """Whether unit ``index`` of ``num_units`` is beyond the depth bound: more than
    ``max_tail_units`` units after it (``None``: no bound, no unit is far).

    A far unit runs no tail forward of its own: no final-output loss term, and its Fisher
    weights come from one pass shared by up to ``max_tail_units`` consecutive far units.
    """
    return max_tail_units is not None and num_units - 1 - index > max_tail_units


def local_only(losses: Sequence[ReconLoss]) -> list[ReconLoss]:
    """The terms of a unit whose final-output gradient is exactly zero.

    Terms on final outputs are constant there and dropped; a Fisher-weighted error with
    all-zero gradients is the plain output error (:class:`FisherMSE`'s fallback).
    """
    out = [OutputMSE(reduction=t.reduction, weight=t.weight) if isinstance(t, FisherMSE) else t
           for t in losses if not t.needs_final_outputs]
    if not any(t.needs_fisher is False and not t.is_regularizer for t in out):
        raise ValueError(f'local_only: no local reconstruction term left in '
                         f'{[t.name for t in losses]}')
    return out


def _check_initialized(units: Sequence[ReconUnit]) -> None:
    # only the units' wrappers: a wrapper the forward never calls is in no unit and its
    # input quantizer is never initialised (init_activation_quantizers warns about it)
    missing = [name for unit in units for name, layer in unit.layers
               for q in layer.input_quantizers().values()
               if q is not None and not q.is_initialized()]
    if missing:
        raise RuntimeError(f'calibrate(start_unit>0): {len(missing)} input quantizers are not '
                           f'initialised (restore the partial checkpoint first): {missing[:5]}')
