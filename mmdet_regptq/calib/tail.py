"""Final model outputs as a function of one unit's output, without rerunning the prefix.

A loss on the detector's final outputs (PD-Quant's KL, Reg-PTQ's global loss) needs the
part of the network *after* unit ``k`` at every iteration. :class:`TailRunner` makes that
cheap: from one traced forward it knows every module call with its start/end counters.
The *prefix* of unit ``k`` is the set of maximal calls that end before unit ``k``'s first
call starts (everything the unit and what follows can only read, never change). For each
calibration batch the outputs of those calls are stored once per unit (from the current
quantized model). At an iteration each prefix module's ``forward`` is temporarily replaced
(an instance attribute, restored afterwards) by a lookup returning the stored output, and
``forward_fn(model, batch)`` runs: only unit ``k`` and what follows is computed. A hook
collects unit ``k``'s outputs, so the local and the global loss come from ONE forward.
Units after ``k`` run in their current state (not yet quantized).

An optional ``tail_fn`` is a cheaper forward with the outputs the final-output loss reads
(Mask R-CNN without its mask head): units it calls run their tails with it; the others
(the mask head's own units) with ``forward_fn``. Each keeps its own trace and FP targets.
A unit ``tail_fn`` never calls cannot change what the loss reads (:meth:`reaches_loss` is
False): its final-output gradient is exactly zero, so callers skip its tails.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from mmengine.logging import MMLogger
from torch import nn

from ..quant import QuantModule
from ..quant.utils import removing
from ._tree import detach_to, tree_map
from ._utils import model_device, quant_disabled
from .cache import GiB, ActivationCache, CacheEntry
from .trace import CallRecord, ForwardFn, StopForward, run_forward, trace_calls
from .units import ReconUnit

#: ``substitute(call_index) -> (args, kwargs)`` replacing the unit's inputs of that call.
Substitute = Callable[[int], tuple[tuple, dict]]


@dataclass
class TailResult:
    """Outputs of one tail forward.

    Attributes:
        outputs: the model's final outputs (``forward_fn``'s return value), with grad.
        unit_outputs: the unit's output of each call, in call order, with grad.
    """

    outputs: Any
    unit_outputs: list


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in nested containers and dataclasses (decoded predictions)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _key(record: CallRecord) -> str:
    return f'{record.name}#{record.index}'


def maximal_prefix(records: Sequence[CallRecord], start: int) -> list[CallRecord]:
    """Calls that end before counter ``start`` and are not nested in another such call.

    Calls are properly nested intervals, so a sweep in start order suffices.
    """
    out: list[CallRecord] = []
    last_end = -1
    for record in sorted(records, key=lambda r: r.start):
        if 0 <= record.end < start and record.start > last_end:
            out.append(record)
            last_end = record.end
    return out


class TailRunner:
    """Runs the model from unit ``k`` on, reading the prefix outputs from a cache.

    Args:
        model: the quantized model.
        forward_fn: ``forward_fn(model, batch)`` runs the model, returns raw outputs.
        batches: the calibration batches (random access by index).
        max_bytes: in-memory cap of each of the two caches (prefix outputs, FP targets).
        spill_dir: where the caches spill.
        fp_context: factory of a context manager active during the FP target forwards.
        tail_fn: optional cheaper forward for the units it calls (module doc); its outputs
            must be what the loss on final outputs reads from ``forward_fn``'s.

    The model's forward must be deterministic in its module calls (the same modules in
    the same order for every batch); a module called more often than traced raises.
    """

    def __init__(self, model: nn.Module, forward_fn: ForwardFn, batches: Sequence[Any], *,
                 max_bytes: int = 2 * GiB, spill_dir: str | None = None,
                 fp_context: Callable[[], ContextManager] | None = None,
                 tail_fn: ForwardFn | None = None) -> None:
        if len(batches) == 0:
            raise ValueError('TailRunner: no calibration batches')
        self.model = model
        self.batches = batches
        self.device = model_device(model)
        self._fp_context = fp_context or contextlib.nullcontext
        self._forwards = [forward_fn] + ([tail_fn] if tail_fn is not None else [])
        self._traces = []
        for fn in self._forwards:
            with torch.no_grad(), quant_disabled(model):
                records, _ = trace_calls(model, fn, batches[0],
                                         is_leaf=lambda m: isinstance(m, QuantModule))
            self._traces.append(records)
        self._active = 0
        self._prefix = ActivationCache(max_bytes=max_bytes, spill_dir=spill_dir)
        self._prefix_device = self._prefix.device
        self._fp_prefix: ActivationCache | None = None
        self._fp_prefix_spilled = False
        #: (active forward, first call start, prefix calls) of the stored prefix
        self._stored_prefix: tuple[int, int, list[CallRecord]] | None = None
        self._decoded: dict[tuple, Any] = {}   # decoded_target()'s results
        self._decoded_bytes = 0
        self._all_targets: dict[int, ActivationCache] = {}
        self._cache_args = dict(max_bytes=max_bytes, spill_dir=spill_dir)
        self._plan: dict[int, tuple[nn.Module, list[str | None]]] = {}
        self.unit: ReconUnit | None = None
        self.seconds = 0.0
        self.num_runs = 0
        self._warned: set[int] = set()

    # ------------------------------------------------------------------ per unit
    def reaches_loss(self, unit: ReconUnit) -> bool:
        """Whether ``unit`` can change the outputs the final-output loss reads.

        Without ``tail_fn`` every unit can; with it, only the units ``tail_fn`` calls.
        """
        return len(self._forwards) == 1 or any(r.name == unit.name for r in self._traces[-1])

    def prepare(self, unit: ReconUnit, *, reuse: bool = False, fp_prefix: bool = False
                ) -> None:
        """Store, per batch, the prefix outputs of ``unit`` from the current model state.

        Also computes the FP final outputs (targets) on the first call.

        Args:
            unit: the unit whose tail the next runs start from.
            reuse: start from the prefix stored for the previously prepared unit (only the
                calls between it and ``unit`` run): the same values as a full prefix pass
                when nothing that ran before the previous unit's first call has changed
                since (calibration changes only the unit it reconstructs, in execution
                order). Falls back to a full pass otherwise (no earlier unit, another
                forward, or an earlier position).
            fp_prefix: also store the prefix outputs of the FP model (all quantization off,
                under ``fp_context``), for :meth:`fp_patched`; only while they fit in
                ``max_bytes`` (once they spill, recomputing is cheaper than reading them
                back, and the runner stops storing them).
        """
        # the cheapest forward that calls the unit (tail_fn is last when given)
        for active in reversed(range(len(self._forwards))):
            first = next((r for r in self._traces[active] if r.name == unit.name), None)
            if first is not None:
                break
        if first is None:
            raise ValueError(f'TailRunner: unit {unit.name!r} was not called in the traced '
                             'forward')
        previous = self._stored_prefix
        reusable = (reuse and previous is not None and previous[0] == active
                    and previous[1] <= first.start)
        self._active = active
        prefix = maximal_prefix(self.records, first.start)
        skip = previous[2] if reusable else []
        plan = self._make_plan(skip) if reusable else None
        old = (self._prefix, self._fp_prefix)
        self._prefix = self._store_prefix(prefix, unit, old[0] if reusable else None, skip,
                                          plan, fp=False)
        self._fp_prefix = None
        if fp_prefix and not self._fp_prefix_spilled:
            store = self._store_prefix(
                prefix, unit, old[1] if reusable and old[1] is not None else None,
                skip, plan, fp=True)
            if store.num_spilled:   # past the memory budget: FP passes from the input
                store.clear()
                self._fp_prefix_spilled = True
            else:
                self._fp_prefix = store
        for cache in old:
            if cache is not None:
                cache.clear()
        self._plan = self._make_plan(prefix)
        self._stored_prefix = (active, first.start, prefix)
        self.unit = unit
        if active not in self._all_targets:
            self._all_targets[active] = self._record_targets()

    def _store_prefix(self, prefix: list[CallRecord], unit: ReconUnit,
                      previous: ActivationCache | None, skip: list[CallRecord],
                      plan: dict | None, fp: bool) -> ActivationCache:
        """Per batch, the outputs of the ``prefix`` calls; with ``previous`` (stored for
        the calls ``skip``, looked up by ``plan``) only the calls after those run."""
        store = ActivationCache(**self._cache_args)
        for b, batch in enumerate(self.batches):
            stored: dict[str, Any] = {}
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if fp:
                    stack.enter_context(quant_disabled(self.model))
                    stack.enter_context(self._fp_context())
                if previous is not None:
                    stack.enter_context(self._patched(previous[b].output, plan))
                stack.enter_context(self._recording(prefix, unit, stored, skip))
                run_forward(self.model, self.forward_fn, batch)
            store.append(CacheEntry(output=stored), copy=False)
        return store

    def fp_patched(self, index: int) -> ContextManager:
        """While active, the prefix modules of the prepared unit return the FP model's
        stored outputs of batch ``index`` (``prepare(fp_prefix=True)``): an FP forward
        with :attr:`forward_fn` computes only the unit and what follows."""
        if self._fp_prefix is None:
            raise RuntimeError('TailRunner.fp_patched() needs prepare(unit, fp_prefix=True)')
        return self._patched(self._fp_prefix[index].output)

    @property
    def has_fp_prefix(self) -> bool:
        """Whether the prepared unit has the FP prefix stored (:meth:`fp_patched`)."""
        return self._fp_prefix is not None

    @property
    def forward_fn(self) -> ForwardFn:
        """The forward the prepared unit's tail runs with."""
        return self._forwards[self._active]

    @property
    def records(self) -> list[CallRecord]:
        """The traced calls of :attr:`forward_fn`."""
        return self._traces[self._active]

    @property
    def _targets(self) -> ActivationCache | None:
        return self._all_targets.get(self._active)

    def _make_plan(self, prefix: list[CallRecord]) -> dict[int, tuple[nn.Module, list]]:
        """Per patched module, its calls in a tail run: a cache key (lookup) or None (live).

        Calls nested inside a prefix call do not happen in a tail run and are left out.
        """
        modules = {id(r.module): r.module for r in prefix}
        plan: dict[int, tuple[nn.Module, list[str | None]]] = {
            mid: (module, []) for mid, module in modules.items()}
        prefix_keys = {_key(r) for r in prefix}
        for record in self.records:
            if id(record.module) not in plan:
                continue
            if any(p.encloses(record) for p in prefix):
                continue
            plan[id(record.module)][1].append(
                _key(record) if _key(record) in prefix_keys else None)
        return plan

    @contextlib.contextmanager
    def _recording(self, prefix: list[CallRecord], unit: ReconUnit,
                   stored: dict[str, Any], skip: Sequence[CallRecord] = ()
                   ) -> Iterator[None]:
        """Store the outputs of the ``prefix`` calls; stop when ``unit`` starts.

        ``skip``: calls whose outputs are looked up (not run), so the calls nested in
        them do not happen; each module's remaining calls are matched to its traced
        calls in order."""
        wanted = {_key(r) for r in prefix}
        modules = {id(r.module): r.module for r in prefix}
        order: dict[int, list[str]] = {mid: [] for mid in modules}
        for record in sorted(self.records, key=lambda r: r.start):
            if id(record.module) in order and not any(p.encloses(record) for p in skip):
                order[id(record.module)].append(_key(record))
        counts: dict[int, int] = {}

        def post_hook(mod: nn.Module, args: Any, output: Any) -> None:
            index = counts.get(id(mod), 0)
            counts[id(mod)] = index + 1
            keys = order[id(mod)]
            key = keys[index] if index < len(keys) else None
            if key in wanted:
                stored[key] = detach_to(output, self._prefix_device)

        def stop(mod: nn.Module, args: Any) -> None:
            raise StopForward

        with removing([]) as handles:
            for module in modules.values():
                handles.append(module.register_forward_hook(post_hook))
            handles.append(unit.module.register_forward_pre_hook(stop))
            yield

    def _record_targets(self) -> ActivationCache:
        targets = ActivationCache(**self._cache_args)
        for batch in self.batches:
            with torch.no_grad(), quant_disabled(self.model), self._fp_context():
                targets.add(output=self.forward_fn(self.model, batch))
        return targets

    # ------------------------------------------------------------------ per iteration
    def target(self, index: int) -> Any:
        """FP final outputs of batch ``index`` (on the model's device)."""
        if self._targets is None:
            raise RuntimeError('TailRunner.target() before prepare()')
        return detach_to(self._targets[index].output, self.device)

    def decoded_target(self, index: int, loss_fn: Any) -> Any:
        """``loss_fn.decode_target(self.target(index))``, decoded once per calibration.

        The FP final outputs are the same for every unit, so their decoding (FGIC's FP
        predictions) is kept while it fits in the cache budget (``max_bytes``); past it
        each call decodes again. The result is shared: callers must not modify it.
        """
        key = (self._active, index, id(loss_fn))
        hit = self._decoded.get(key)
        if hit is not None:
            return hit
        decoded = loss_fn.decode_target(self.target(index))
        size = _nbytes(decoded)
        if self._decoded_bytes + size <= self._cache_args['max_bytes']:
            self._decoded[key] = decoded
            self._decoded_bytes += size
        return decoded

    def run(self, index: int, *, substitute: Substitute | None = None,
            unit_outputs: bool = True) -> TailResult:
        """Forward of batch ``index`` from the prepared unit on (grad follows the caller).

        Args:
            index: calibration batch index.
            substitute: optional replacement of the unit's inputs per call (the cached,
                possibly FP-mixed inputs of a reconstruction iteration).
            unit_outputs: collect the unit's outputs (False: ``TailResult.unit_outputs``
                is empty and the model's tensors pass untouched, e.g. for a gradient tap).

        Returns:
            The final outputs and the unit's outputs (after its post chain, the
            activation that follows a layer unit), both differentiable w.r.t. the unit's
            parameters.
        """
        if self.unit is None:
            raise RuntimeError('TailRunner.run() before prepare()')
        stored = self._prefix[index].output
        calls = [0]

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            if substitute is not None:
                return substitute(calls[0])
            return None

        post = self.unit.post
        collected: list = []
        collect = unit_outputs

        def post_hook(mod: nn.Module, args: Any, output: Any) -> Any:
            calls[0] += 1
            if not collect:
                return None
            if not post:
                collected.append(output)
                return None
            # the unit's output is after its activation; the model's own (maybe in-place)
            # activation runs on a copy, so the one recomputed here keeps its graph
            collected.append(post(output))
            return tree_map(lambda t: t.clone(), output)

        tic = time.perf_counter()
        with self._patched(stored), removing([]) as handles:
            handles.append(self.unit.module.register_forward_pre_hook(pre_hook,
                                                                      with_kwargs=True))
            handles.append(self.unit.module.register_forward_hook(post_hook))
            outputs = self.forward_fn(self.model, self.batches[index])
        self.seconds += time.perf_counter() - tic
        self.num_runs += 1
        return TailResult(outputs=outputs, unit_outputs=collected)

    @contextlib.contextmanager
    def _patched(self, stored: dict[str, Any], plan: dict | None = None) -> Iterator[None]:
        saved: list[tuple[nn.Module, Any]] = []
        try:
            for module, steps in (self._plan if plan is None else plan).values():
                saved.append((module, module.__dict__.get('forward')))
                module.forward = self._lookup(module, iter(steps), stored)
            yield
        finally:
            for module, previous in saved:
                if previous is None:
                    del module.__dict__['forward']
                else:
                    module.forward = previous

    def _lookup(self, module: nn.Module, steps: Iterator[str | None],
                stored: dict[str, Any]) -> Callable:
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            key = next(steps, StopIteration)
            if key is StopIteration:
                # a direct ``module.forward(x)`` call runs no hooks, so the trace does not
                # count it (CondInst/BoxInst call ``bbox_head.forward(x)`` and then
                # ``bbox_head.loss(x)``, which calls it again): the extra call runs live
                if id(module) not in self._warned:
                    self._warned.add(id(module))
                    MMLogger.get_current_instance().warning(
                        f'TailRunner: {type(module).__name__} was called more often than in '
                        'the traced forward (a direct .forward() call); the extra calls run '
                        'live')
                return original(*args, **kwargs)
            if key is None:
                return original(*args, **kwargs)
            return detach_to(stored[key], self.device)

        return forward

    def release(self) -> None:
        """Free the caches (end of calibration)."""
        self._prefix.clear()
        if self._fp_prefix is not None:
            self._fp_prefix.clear()
            self._fp_prefix = None
        self._stored_prefix = None
        self._decoded.clear()
        self._decoded_bytes = 0
        for targets in self._all_targets.values():
            targets.clear()
        self._all_targets = {}
        self.unit = None
