"""THE reconstruction loop: one unit, cached entries, pluggable loss terms, optimiser groups.

Every reconstruction-based method (AdaRound, AdaQuant, BRECQ, QDrop, PD-Quant, Reg-PTQ)
is this loop with different loss terms, parameter groups and drop settings. A layer is a
unit of one module.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from mmengine.logging import MMLogger
from torch import Tensor, nn

from ..quant.utils import removing
from ._tree import detach_to, float_tensors, tree_map, tree_tensors
from ._utils import model_device, requires_grad
from . import dist as calib_dist
from .cache import ActivationCache, CacheEntry
from .losses import ReconContext, ReconLoss
from .tail import TailRunner
from .units import ReconUnit


#: ``reconstruct(local_draw=...)``: what an iteration without the tail draws.
LOCAL_DRAWS = ('batch', 'call')


def check_local_draw(local_draw: str, where: str = '') -> None:
    """One check for :data:`LOCAL_DRAWS`: RegPTQ runs it when configured (fail before any
    calibration), :func:`reconstruct` for its direct callers."""
    if local_draw not in LOCAL_DRAWS:
        raise ValueError(f'{where}local_draw={local_draw!r} is unknown; allowed: '
                         f'{list(LOCAL_DRAWS)}')


@dataclass
class OptimGroup:
    """Parameters trained by one Adam optimiser.

    Attributes:
        name: label in logs (``'alpha'``, ``'act_scale'``, ``'weight'``).
        params: the parameters.
        lr: Adam learning rate.
        cosine: anneal the learning rate to 0 with a cosine over the iterations.
    """

    name: str
    params: list[nn.Parameter]
    lr: float
    cosine: bool = False


@dataclass
class ReconStats:
    """Outcome of :func:`reconstruct`.

    Attributes:
        unit: unit name.
        kind: ``'block'`` or ``'layer'``.
        iters: iterations run.
        loss_before: local reconstruction error (non-regulariser terms that do not need
            final outputs) on a fixed entry with hard rounding, before training.
        loss_after: the same after training (rounding hardened).
        seconds: wall time of the whole call.
        tail_share: share of the training loop's time spent in tail forwards.
        notes: the loss terms' summaries (e.g. the FGIC filter's kept fraction).
    """

    unit: str
    kind: str
    iters: int
    loss_before: float
    loss_after: float
    seconds: float
    tail_share: float = 0.0
    notes: list[str] = field(default_factory=list)


def rounding_quantizers(unit: ReconUnit) -> list[nn.Module]:
    """Weight quantizers of the unit that learn their rounding (``regularizer``/``harden``)."""
    found: list[nn.Module] = []
    for _, layer in unit.layers:
        for q in layer.weight_quantizers().values():
            if q is not None and hasattr(q, 'regularizer') and hasattr(q, 'harden'):
                found.append(q)
    return found


def mix_inputs(q_args: Any, fp_args: Any, prob: float) -> Any:
    """Each element takes its FP value with probability ``prob`` (raw tensors; the unit's
    loop mixes after the input quantizer instead, :class:`InputMixer`).

    Args:
        q_args: inputs from the quantized model (nested structure).
        fp_args: the same structure from the FP model.
        prob: probability of the FP value per element.
    """
    if isinstance(q_args, Tensor):
        if not q_args.is_floating_point():
            return q_args
        return torch.where(torch.rand_like(q_args) < prob, fp_args, q_args)
    if isinstance(q_args, (tuple, list)):
        return type(q_args)(mix_inputs(q, f, prob) for q, f in zip(q_args, fp_args))
    if isinstance(q_args, dict):
        return {k: mix_inputs(v, fp_args[k], prob) for k, v in q_args.items()}
    return q_args


class InputMixer:
    """QDrop's mixing at a unit's input: ONE decision per element, after quantization.

    QDrop's unit reads ``where(u < p, x_fp, Q(x_q))``: each input element is either its
    quantized value or its full-precision one. Here the quantizer of a unit's input is the
    input quantizer of the unit's first layers, so the decision is made there: a forward
    hook on each input quantizer of the unit replaces its output by the mixed tensor when
    it reads an armed unit input, with one mask per input tensor (shared by every layer
    that reads it, e.g. a block's conv1 and downsample), and that layer's own drop is off
    for the call (a second drop would leave four states). The layers inside a block still
    drop their own inputs (QDrop's activation quantizers inside a block do).

    A unit input that no input quantizer reads as is (found by :meth:`probe`) is mixed
    before the unit, as raw values.
    """

    def __init__(self, unit: ReconUnit, prob: float) -> None:
        self.unit = unit
        self.prob = prob
        self._armed: dict[int, tuple[Tensor, Tensor, Tensor]] = {}   # id(q) -> (q, fp, mask)
        self.direct: set[int] | None = None   # positions read by a quantizer (None: all)
        self._hits: set[int] = set()
        self._position: dict[int, int] = {}

    def clear(self) -> None:
        self._armed.clear()
        self._position.clear()

    def arm(self, q_args: Any, fp_args: Any | None) -> Any:
        """Masks for the float tensors of ``q_args``; returns the args to pass to the unit
        (the same objects, except positions mixed before the unit). ``fp_args=None``: no
        mixing, but the first layers still quantize without a drop of their own (a purely
        quantized input, PD-Quant's prediction pass)."""
        fps = iter(float_tensors(fp_args)) if fp_args is not None else None
        position = iter(range(1 << 30))

        def one(q: Tensor) -> Tensor:
            if not q.is_floating_point():
                return q
            pos = next(position)
            if fps is None:
                self._armed[id(q)] = (q, None, None)
                self._position[id(q)] = pos
                return q
            fp = next(fps)
            mask = torch.rand_like(q) < self.prob
            if self.direct is not None and pos not in self.direct:
                return torch.where(mask, fp, q)
            self._armed[id(q)] = (q, fp, mask)
            self._position[id(q)] = pos
            return q

        return tree_map(one, q_args)

    def _lookup(self, args: Any) -> list[tuple[Tensor, Tensor, Tensor]]:
        found = []
        for t in tree_tensors(args):
            entry = self._armed.get(id(t))
            if entry is not None and entry[0] is t:
                found.append(entry)
        return found

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Hooks on the unit's layers and their input quantizers while the block runs."""
        saved: dict[int, float] = {}

        def layer_pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._lookup((args, kwargs)):
                saved[id(mod)] = mod.drop_prob
                mod.drop_prob = 0.0

        def layer_post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if id(mod) in saved:
                mod.drop_prob = saved.pop(id(mod))

        def quantizer_post(mod: nn.Module, args: tuple, output: Any) -> Any:
            found = self._lookup(args[:1])
            if not found or not isinstance(output, Tensor):
                return None
            q, fp, mask = found[0]
            self._hits.add(self._position[id(q)])
            return output if fp is None else torch.where(mask, fp, output)

        with removing([]) as handles:
            for _, layer in self.unit.layers:
                handles.append(layer.register_forward_pre_hook(layer_pre, with_kwargs=True))
                handles.append(layer.register_forward_hook(layer_post, with_kwargs=True))
                for q in layer.input_quantizers().values():
                    if q is not None:
                        handles.append(q.register_forward_hook(quantizer_post))
            try:
                yield
            finally:
                for _, layer in self.unit.layers:
                    if id(layer) in saved:
                        layer.drop_prob = saved.pop(id(layer))

    @torch.no_grad()
    def probe(self, entry: CacheEntry, device: torch.device) -> None:
        """Which input positions a quantizer reads directly (one forward of the unit)."""
        self.direct, self._hits = None, set()
        args = detach_to(entry.args, device)
        fp = detach_to(entry.extras['fp_args'], device)
        with self.installed():
            self.unit(*self.arm(args, fp), **detach_to(entry.kwargs, device))
        self.direct = set(self._hits)
        self.clear()
        missing = len(float_tensors(args)) - len(self.direct)
        if missing:
            MMLogger.get_current_instance().debug(
                f'{self.unit.name}: {missing} unit inputs reach no input quantizer as is; '
                'they are mixed before the unit')


@contextlib.contextmanager
def shared_weights(unit: ReconUnit) -> Iterator[None]:
    """While active, each layer of ``unit`` quantizes its weight once and every call of the
    layer reads that tensor (a head shared by 5 FPN levels: 1 weight quantization instead
    of 5, in the forward and in the backward).

    The outputs are the same values; the gradient reaches the quantizer's parameters
    through one node, summed over the calls first (the same up to float rounding). Only
    for one forward whose weights do not change in between (one iteration).
    """
    layers = [layer for _, layer in unit.layers]
    saved = [layer.__dict__.get('quantized_weight') for layer in layers]
    try:
        for layer in layers:
            layer.quantized_weight = _once(layer.quantized_weight)
        yield
    finally:
        for layer, previous in zip(layers, saved):
            if previous is None:
                layer.__dict__.pop('quantized_weight', None)
            else:
                layer.quantized_weight = previous


def _once(quantized_weight: Any) -> Any:
    memo: dict = {}

    def weight(slot: str | None = None) -> Tensor:
        if slot not in memo:
            memo[slot] = quantized_weight(slot)
        return memo[slot]

    return weight


class _Loop:
    """State of one reconstruction: draws entries, runs the unit (or the tail), scores."""

    def __init__(self, unit: ReconUnit, cache: ActivationCache, losses: Sequence[ReconLoss],
                 tail: TailRunner | None, fp_input_prob: float, device: torch.device,
                 iters: int) -> None:
        self.unit = unit
        self.cache = cache
        self.losses = list(losses)
        self.tail = tail if any(t.needs_final_outputs for t in self.losses) else None
        self.unmixed_tail = any(t.needs_final_outputs and t.final_from_quant_input
                                for t in self.losses)
        self.fp_input_prob = fp_input_prob
        self.mixer = InputMixer(unit, fp_input_prob) if fp_input_prob > 0 else None
        self.device = device
        if self.mixer is not None and 'fp_args' in cache[0].extras:
            self.mixer.probe(cache[0], device)
        self.iters = iters
        self.quantizers = rounding_quantizers(unit)
        self.by_batch: dict[int, list[int]] = {}  # tail mode draws a batch: all its calls
        if self.tail is not None:
            for (batch, _call), index in sorted(cache.keys().items()):
                self.by_batch.setdefault(batch, []).append(index)

    def num_draws(self, with_tail: bool = True, local_draw: str = 'batch') -> int:
        """Entries to draw from: calibration batches in tail mode (all of a batch's calls
        run, so the tail sees a whole prediction), single cached calls otherwise."""
        return len(self.by_batch) if self._by_batch(with_tail, local_draw) else len(self.cache)

    def _by_batch(self, with_tail: bool, local_draw: str) -> bool:
        return self.tail is not None and (with_tail or local_draw == 'batch')

    def _inputs(self, entry: CacheEntry, mix: bool) -> tuple[tuple, dict]:
        args = detach_to(entry.args, self.device)
        if self.mixer is not None:
            if 'fp_args' not in entry.extras:
                raise ValueError(f'{self.unit.name}: input mixing needs FP inputs in the '
                                 'cache (capture with fp_inputs=True)')
            fp = detach_to(entry.extras['fp_args'], self.device) if mix else None
            args = self.mixer.arm(args, fp)
        return args, detach_to(entry.kwargs, self.device)

    def context(self, draw: int, iteration: int, mix: bool,
                with_tail: bool = True, local_draw: str = 'batch') -> ReconContext:
        """Forward of draw ``draw`` (an entry, or a batch in tail mode) → loss context.

        In tail mode with ``with_tail=False`` the draw runs through the unit only (no final
        outputs: the terms that need them are left out of that iteration): all of the
        batch's entries with ``local_draw='batch'``, the one cached call ``draw`` with
        ``'call'``."""
        entries = ([self.cache[i] for i in self.by_batch[draw]]
                   if self._by_batch(with_tail, local_draw) else [self.cache[draw]])
        if len(entries) > 1 or (self.tail is not None and with_tail
                                and self.unit.num_calls > 1):
            with shared_weights(self.unit):   # several calls of the unit in one forward
                return self._context(entries, draw, iteration, mix, with_tail)
        return self._context(entries, draw, iteration, mix, with_tail)

    def _context(self, entries: list[CacheEntry], draw: int, iteration: int, mix: bool,
                 with_tail: bool) -> ReconContext:
        if self.mixer is not None:
            self.mixer.clear()
        if self.tail is not None and with_tail:
            # PD-Quant: the prediction pass reads the quantized input, the local terms the
            # mixed one (two forwards); Reg-PTQ: one forward of the mixed input for both
            separate = mix and self.mixer is not None and self.unmixed_tail
            result = self.tail.run(draw, substitute=lambda c: self._inputs(
                entries[c], mix and not separate))
            outputs, final_pred = result.unit_outputs, result.outputs
            final_target = self.tail.target(draw)
            if separate:
                outputs = []
                for entry in entries:
                    args, kwargs = self._inputs(entry, True)
                    outputs.append(self.unit(*args, **kwargs))
        else:
            outputs, final_pred, final_target = [], None, None
            for entry in entries:
                args, kwargs = self._inputs(entry, mix)
                outputs.append(self.unit(*args, **kwargs))
        fisher = None
        if all('grad' in e.extras for e in entries):
            fisher = [detach_to(g, self.device) for e in entries for g in e.extras['grad']]
        return ReconContext(
            unit=self.unit, pred=float_tensors(outputs),
            target=float_tensors(detach_to([e.output for e in entries], self.device)),
            fisher=fisher, quantizers=self.quantizers, iteration=iteration,
            total_iters=self.iters, final_pred=final_pred, final_target=final_target,
            target_key=draw if final_target is not None else None,
            decode_target=(functools.partial(self.tail.decoded_target, draw)
                           if final_target is not None else None))

    def score(self, ctx: ReconContext, regularizers: bool = True) -> dict[str, Tensor]:
        return {t.name: t(ctx) for t in self.losses
                if (regularizers or not t.is_regularizer)
                and (ctx.final_pred is not None or not t.needs_final_outputs)}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Local reconstruction error on draw 0: hard rounding, no drop, no input mixing.

        The terms on final outputs are left out: a tail forward only for this log line
        was a quarter of a 2-iteration calibration (py-spy, SOLOv2 zoo row)."""
        soft = [q.soft_targets for q in self.quantizers]
        for q in self.quantizers:
            q.soft_targets = False
        try:
            with _train_mode(self.unit, False):
                terms = self.score(self.context(0, 0, mix=False, with_tail=False),
                                   regularizers=False)
        finally:
            for q, flag in zip(self.quantizers, soft):
                q.soft_targets = flag
        return float(sum(terms.values())) if terms else 0.0


@contextlib.contextmanager
def _train_mode(unit: ReconUnit, flag: bool) -> Iterator[None]:
    """Training mode (QDrop's drop is active only there) for the unit's wrappers only."""
    layers = [layer for _, layer in unit.layers]
    saved = [(m, m.training) for layer in layers for m in layer.modules()]
    try:
        for layer in layers:
            layer.train(flag)
        yield
    finally:
        for module, mode in saved:
            module.training = mode


@contextlib.contextmanager
def _drop(unit: ReconUnit, prob: float) -> Iterator[None]:
    layers = [layer for _, layer in unit.layers]
    saved = [layer.drop_prob for layer in layers]
    try:
        for layer in layers:
            layer.drop_prob = prob
        yield
    finally:
        for layer, p in zip(layers, saved):
            layer.drop_prob = p


def _optimizers(groups: Sequence[OptimGroup], iters: int) -> list[tuple[Any, Any]]:
    out = []
    for group in groups:
        if not group.params:
            continue
        opt = torch.optim.Adam(group.params, lr=group.lr)
        sched = None
        if group.cosine:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iters, 1),
                                                               eta_min=0.0)
        out.append((opt, sched))
    return out


def reconstruct(unit: ReconUnit, cache: ActivationCache, *, iters: int,
                losses: Sequence[ReconLoss], param_groups: Sequence[OptimGroup],
                tail: TailRunner | None = None, drop_prob: float = 0.0,
                fp_input_prob: float = 0.0, seed: int = 0, log_interval: int = 500,
                logger: logging.Logger | None = None, tail_interval: int = 1,
                local_draw: str = 'batch') -> ReconStats:
    """Reconstruct ``unit`` (whose quantization the caller has switched on).

    Per iteration: draw a cached entry (seeded generator) — or, when a loss needs final
    outputs, a calibration batch run through ``tail`` — recompute the unit's output, sum
    the loss terms, backpropagate into the parameter groups only, and step each group's
    Adam (and its cosine schedule). AdaRound quantizers train with soft rounding and are
    hardened at the end.

    Args:
        unit: the unit.
        cache: entries from :func:`capture_unit` for this unit.
        iters: iterations (0 = only harden and measure).
        losses: loss terms.
        param_groups: trained parameters, one Adam per group.
        tail: prepared for ``unit``; required when a loss needs final outputs.
        drop_prob: QDrop's drop probability of the unit's wrappers during training.
        fp_input_prob: QDrop's mixing of FP inputs into the cached quantized inputs.
        seed: seeds the entry draws and the random masks (global RNG forked, restored).
        log_interval: log the loss terms every this many iterations.
        logger: defaults to the current MMLogger.
        tail_interval: with a tail, run it (and the terms that need final outputs) on every
            ``tail_interval``-th iteration only, the others on the unit alone: the tail's
            forward + backward is most of a global-loss iteration's cost.
        local_draw: with a tail, what the iterations without it draw: ``'batch'`` (all of
            a calibration batch's calls of the unit, as the tail iterations do) or
            ``'call'`` (one cached call, as without a tail: a head shared by 5 FPN levels
            then runs one level per iteration instead of five).

    Returns:
        :class:`ReconStats`.

    Raises:
        ValueError: empty cache, no loss, or a tail-loss without ``tail``.
        FloatingPointError: a non-finite loss (names the unit, the iteration and terms).
    """
    logger = logger or MMLogger.get_current_instance()
    if len(cache) == 0:
        raise ValueError(f'reconstruct({unit.name!r}): the activation cache is empty')
    if not losses:
        raise ValueError(f'reconstruct({unit.name!r}): no loss terms')
    if isinstance(tail_interval, bool) or not isinstance(tail_interval, int) \
            or tail_interval < 1:
        raise ValueError(f'reconstruct({unit.name!r}): tail_interval={tail_interval!r} must be '
                         'an int >= 1')
    check_local_draw(local_draw, f'reconstruct({unit.name!r}): ')
    if any(t.needs_final_outputs for t in losses) and tail is None:
        raise ValueError(f'reconstruct({unit.name!r}): a loss needs final outputs; pass a '
                         'TailRunner prepared for this unit')
    tic = time.perf_counter()
    device = model_device(unit.module)
    loop = _Loop(unit, cache, losses, tail, fp_input_prob, device, iters)
    trained = [p for g in param_groups for p in g.params]
    if not trained and iters:
        logger.warning(f'reconstruct({unit.name!r}): nothing to train; skipping the loop')
        iters = 0
    frozen = list(unit.module.parameters()) + (list(tail.model.parameters()) if tail else [])
    for q in loop.quantizers:
        q.soft_targets = True
    loss_before = loop.evaluate()
    tail_before = tail.seconds if tail else 0.0
    loop_tic = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    rng_devices = [device] if device.type != 'cpu' else []
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type), \
            requires_grad(frozen, False), requires_grad(trained, True), \
            _drop(unit, drop_prob), _train_mode(unit, drop_prob > 0), torch.enable_grad(), \
            (loop.mixer.installed() if loop.mixer is not None else contextlib.nullcontext()):
        torch.manual_seed(calib_dist.rank_seed(seed))   # masks; the draws stay ``gen``'s
        optimizers = _optimizers(param_groups, iters)
        for it in range(iters):
            with_tail = it % tail_interval == 0
            draw = int(torch.randint(loop.num_draws(with_tail, local_draw), (1,),
                                     generator=gen))
            terms = loop.score(loop.context(draw, it, mix=True, with_tail=with_tail,
                                            local_draw=local_draw))
            total = sum(terms.values())
            if not torch.isfinite(total):
                values = ', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())
                raise FloatingPointError(f'reconstruct({unit.name!r}): non-finite loss at '
                                         f'iteration {it}/{iters} ({values})')
            for opt, _ in optimizers:
                opt.zero_grad(set_to_none=True)
            total.backward()
            calib_dist.all_reduce_grads(trained)   # data-parallel: the ranks' mean
            for opt, sched in optimizers:
                opt.step()
                if sched is not None:
                    sched.step()
            if log_interval and (it + 1) % log_interval == 0:
                logger.info(f'{unit.name} [{it + 1}/{iters}] ' + ', '.join(
                    f'{k}={v.item():.4g}' for k, v in terms.items()))
    loop_seconds = time.perf_counter() - loop_tic
    tail_seconds = (tail.seconds - tail_before) if tail else 0.0
    for q in loop.quantizers:
        q.harden()
    loss_after = loop.evaluate()
    notes = [line for line in (t.summary() for t in losses) if line]
    for line in notes:   # e.g. FGIC's kept fraction
        logger.info(f'{unit.name}: {line}')
    return ReconStats(unit=unit.name, kind=unit.kind, iters=iters, loss_before=loss_before,
                      loss_after=loss_after, seconds=time.perf_counter() - tic,
                      tail_share=tail_seconds / loop_seconds if loop_seconds > 0 else 0.0,
                      notes=notes)
