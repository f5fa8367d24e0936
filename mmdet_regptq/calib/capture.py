"""Capturing a unit's inputs, target outputs and output gradients over the calibration set.

For unit ``k`` and every calibration batch:

1. full-precision pass (all quantization off): the unit's outputs are the reconstruction
   targets; its inputs are kept too when ``fp_inputs`` (QDrop mixes FP and quantized
   inputs). The pass stops right after the unit's last call, unless gradients are wanted.
2. quantized pass (the caller has switched units ``< k`` on, ``k`` and later off): the
   unit's inputs. Without gradients it stops at the unit's last call, so only the prefix
   of the network runs.
3. with ``grad_loss``: the quantized pass runs to the end with unit ``k`` quantized, its
   outputs replaced by detached leaves, and ``dL/dO`` of
   ``grad_loss(fp_outputs, q_outputs)`` is stored for each call (BRECQ's Fisher loss).
   The same backward also passes the outputs of the units after ``k`` (still FP): with
   ``share_with`` their gradients are kept too, so a later unit can take its Fisher
   weights from this pass (``given_grads``) instead of one tail forward + backward per
   batch of its own.

With a :class:`~.tail.TailRunner` prepared for unit ``k`` (the methods with a global loss
have one) the passes reuse its stores: the FP final outputs are its targets (computed once
for all units), and the quantized pass starts from its stored prefix outputs, so only unit
``k`` and what follows runs - the same values as a full pass, at about half the cost. When
the runner also stores the FP prefix (``prepare(fp_prefix=True)``) the FP pass starts from
it too.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..quant.utils import removing
from ._tree import detach_to, float_tensors, tree_map
from ._utils import quant_disabled, requires_grad
from .activation import ChainTap
from .cache import ActivationCache, CacheEntry
from .trace import ForwardFn, StopForward, run_forward
from .units import ReconUnit

if TYPE_CHECKING:
    from .tail import TailRunner

GradLoss = Callable[[Any, Any], Tensor]


def output_mse(fp_outputs: Any, q_outputs: Any) -> Tensor:
    """Default ``grad_loss``: sum over output tensors of the mean squared difference.

    Args:
        fp_outputs: raw outputs of the full-precision model (any nested structure).
        q_outputs: the same structure from the quantized model.

    Returns:
        A scalar.
    """
    pairs = list(zip(float_tensors(fp_outputs), float_tensors(q_outputs)))
    if not pairs:
        raise ValueError('output_mse: the model outputs hold no floating-point tensor')
    return sum(torch.mean((q - fp.detach()) ** 2) for fp, q in pairs)


@dataclass
class _CallLog:
    args: list = field(default_factory=list)
    kwargs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    leaves: list = field(default_factory=list)   # grad-enabled output tensors per call


@contextlib.contextmanager
def record_calls(module: nn.Module, num_calls: int, device: torch.device, *,
                 inputs: bool = False, outputs: bool = False, stop: bool = False,
                 leaf_outputs: bool = False) -> Iterator[_CallLog]:
    """Record what ``module`` sees while the block runs.

    Args:
        module: the hooked module.
        num_calls: calls per forward; with ``stop`` the forward is ended (by
            :class:`StopForward`) once the last one has what is recorded.
        device: where the recorded copies go.
        inputs: record positional and keyword inputs.
        outputs: record outputs.
        stop: end the forward after the last needed call.
        leaf_outputs: replace each output's float tensors by detached leaves requiring
            grad (gradients w.r.t. the unit output, without a backward into the prefix).

    Yields:
        The log, filled while the forward runs.
    """
    log = _CallLog()

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if inputs:
            log.args.append(detach_to(args, device))
            log.kwargs.append(detach_to(kwargs, device))
            if stop and not outputs and len(log.args) == num_calls:
                raise StopForward

    def post_hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if outputs:
            log.outputs.append(detach_to(output, device))
        if leaf_outputs:
            leaves = tree_map(lambda t: t.detach().requires_grad_(True)
                              if t.is_floating_point() else t, output)
            log.leaves.append(float_tensors(leaves))
            # pass on non-leaf copies: the next op may be in place (ReLU(inplace=True))
            output = tree_map(lambda t: t.clone() if t.requires_grad else t, leaves)
        if stop and outputs and len(log.outputs) == num_calls:
            raise StopForward
        return output if leaf_outputs else None

    with removing([]) as handles:
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
        yield log


def capture_unit(model: nn.Module, unit: ReconUnit, batches: Iterable[Any],
                 forward_fn: ForwardFn, cache: ActivationCache, *, fp_inputs: bool = False,
                 grad_loss: GradLoss | None = None,
                 fp_context: Callable[[], ContextManager] | None = None,
                 tail: TailRunner | None = None, share_with: Sequence[ReconUnit] = (),
                 shared_grads: dict[str, ActivationCache] | None = None,
                 given_grads: ActivationCache | None = None) -> ActivationCache:
    """Fill ``cache`` with one entry per call of ``unit`` per calibration batch.

    The caller sets the quantization state first: units before ``unit`` on, ``unit`` and
    later ones off.

    Args:
        model: the quantized model.
        unit: the unit.
        batches: calibration batches, iterated once.
        forward_fn: ``forward_fn(model, batch)`` runs the model.
        cache: receives :class:`CacheEntry` objects (key ``(batch, call)``) with
            ``args`` / ``kwargs`` from the quantized model, ``output`` from the FP model
            and ``extras``: ``'batch'``, ``'call'``, ``'fp_args'`` (when ``fp_inputs``)
            and ``'grad'`` (when ``grad_loss``: a list of tensors matching the output's
            float tensors).
        fp_inputs: also record the FP model's inputs of the unit.
        grad_loss: ``grad_loss(fp_outputs, q_outputs) -> scalar`` over the model's final
            outputs; when given, ``dL/dO`` of every call is stored.
        fp_context: factory of a context manager active during full-precision passes
            (e.g. one that swaps original weights back in after AdaQuant changed them).
        tail: a :class:`~.tail.TailRunner` already prepared for ``unit`` over the same
            ``batches`` (same order): the quantized pass runs from its stored prefix and
            the FP final outputs come from its targets (see the module docstring).
        share_with: units after ``unit`` whose output gradients the ``grad_loss`` pass
            also keeps (they run in full precision there).
        shared_grads: one empty cache per ``share_with`` unit name; receives an entry
            per batch and call (key ``(batch, call)``, ``extras['grad']``).
        given_grads: such a cache of ``unit``, filled by an earlier unit's pass: its
            gradients are stored as ``'grad'`` without a gradient pass (``grad_loss``
            must then be None).

    Returns:
        ``cache``.

    Raises:
        RuntimeError: the FP and quantized passes called the unit a different number of
            times for one batch.
    """
    device = cache.device
    fp_context = fp_context or contextlib.nullcontext
    if given_grads is not None and grad_loss is not None:
        raise ValueError(f'capture_unit({unit.name!r}): given_grads and grad_loss exclude '
                         'each other')
    if share_with and (grad_loss is None or shared_grads is None
                       or any(u.name not in shared_grads for u in share_with)):
        raise ValueError(f'capture_unit({unit.name!r}): share_with needs grad_loss and a '
                         'shared_grads cache per unit')
    if tail is not None and tail.unit is not unit:
        raise ValueError(f'capture_unit({unit.name!r}): the tail runner is prepared for '
                         f'{getattr(tail.unit, "name", None)!r}; call tail.prepare(unit) first')
    # with the tail's FP prefix the FP pass starts at the unit (its output is not read then)
    fp_prefix = tail is not None and tail.has_fp_prefix
    for b, batch in enumerate(batches):
        with torch.no_grad(), quant_disabled(model), fp_context(), \
                (tail.fp_patched(b) if fp_prefix else contextlib.nullcontext()), \
                record_calls(unit.module, unit.num_calls, device, inputs=fp_inputs,
                             outputs=True, stop=grad_loss is None or tail is not None) as fp:
            fp_final, _ = run_forward(model, tail.forward_fn if fp_prefix else forward_fn,
                                      batch)
        run = ((lambda b=b: tail.run(b, unit_outputs=False).outputs) if tail is not None
               else functools.partial(forward_fn, model, batch))
        if grad_loss is None:
            with torch.no_grad(), record_calls(unit.module, unit.num_calls, device,
                                               inputs=True, stop=True) as q:
                run_forward(model, lambda _m, _b: run(), batch)
            grads = None
            if given_grads is not None:
                grads = [given_grads[given_grads.index((b, i))].extras['grad']
                         for i in range(len(fp.outputs))]
        else:
            unit_loss = grad_loss
            if tail is not None:
                fp_final = tail.target(b)
                if hasattr(grad_loss, 'loss_decoded'):   # FGIC: the FP side decoded once
                    unit_loss = _with_decoded_target(grad_loss, tail, b)
            q, grads, later = _output_grads(model, unit, run, unit_loss, fp_final, device,
                                            share_with)
            for name, calls in later.items():
                for i, call_grads in enumerate(calls):
                    shared_grads[name].append(CacheEntry(extras=dict(grad=call_grads)),
                                              key=(b, i), copy=False)
        if len(q.args) != len(fp.outputs):
            raise RuntimeError(
                f'capture_unit({unit.name!r}): batch {b} called the unit {len(fp.outputs)} '
                f'times in full precision but {len(q.args)} times quantized')
        for i, output in enumerate(fp.outputs):
            if unit.post:    # the unit's output: after the activation that follows it
                with torch.no_grad():
                    output = unit.post(output)
            extras: dict[str, Any] = dict(batch=b, call=i)
            if fp_inputs:
                extras['fp_args'] = fp.args[i]
            if grads is not None:
                extras['grad'] = grads[i]
            cache.append(CacheEntry(q.args[i], q.kwargs[i], output, extras), key=(b, i),
                         copy=False)
    return cache


def _with_decoded_target(loss_fn: Any, tail: TailRunner, index: int) -> GradLoss:
    """``loss_fn(fp, q)`` with the FP side decoded once per calibration by ``tail``
    (:meth:`~.tail.TailRunner.decoded_target`): the same value as ``loss_fn(fp, q)``."""
    def loss(fp_final: Any, q_final: Any) -> Tensor:
        return loss_fn.loss_decoded(tail.decoded_target(index, loss_fn), q_final)
    return loss


def _output_grads(model: nn.Module, unit: ReconUnit, run: Callable[[], Any],
                  grad_loss: GradLoss, fp_final: Any, device: torch.device,
                  share_with: Sequence[ReconUnit] = ()
                  ) -> tuple[_CallLog, list[list[Tensor]], dict[str, list[list[Tensor]]]]:
    """Quantized forward (``run()``: full, or a tail run) with ``unit`` quantized;
    gradients of ``grad_loss`` w.r.t. the unit's outputs (and those of ``share_with``).

    A unit with a post chain (its activation) is tapped at the chain's end
    (:class:`~.activation.ChainTap`): the gradient is w.r.t. the output it reconstructs.

    Returns:
        ``(log, grads, later)``: the call log (the unit's inputs); per call, the gradients
        of the output's float tensors (on ``device``); the same per ``share_with`` unit name.
    """
    chained = {u.name: u for u in (unit, *share_with) if u.post}
    chain_tap = ChainTap({name: u.post for name, u in chained.items()}) if chained else None
    plain = [u for u in share_with if not u.post]
    unit.set_quant(True)
    try:
        with torch.enable_grad(), requires_grad(model.parameters(), False), \
                record_calls(unit.module, unit.num_calls, device, inputs=True,
                             leaf_outputs=not unit.post) as log, \
                _gradient_taps(plain, device) as taps, \
                _chain_tapping(chain_tap, chained.values()):
            loss = grad_loss(fp_final, run())
            leaves = [t for call in log.leaves for t in call]
            chain_leaves = chain_tap.leaf_list() if chain_tap is not None else []
            inputs = (leaves + [leaf for tap in taps.values() for leaf in tap.leaves.values()]
                      + [leaf for _, _, leaf in chain_leaves])
            # a loss that does not see this unit (a mask head under a box loss) has no
            # graph: zero gradients, which FisherMSE reads as "no weighting"
            found = (torch.autograd.grad(loss, inputs, allow_unused=True)
                     if loss.requires_grad and inputs else [None] * len(inputs))
    finally:
        unit.set_quant(False)
    grads = iter(found[:len(leaves)])
    rest = iter(found[len(leaves):])
    per_call = [[(g if g is not None else torch.zeros_like(t)).detach().to(device)
                 for t, g in zip(call, grads)] for call in log.leaves]
    later = {name: tap.collect([next(rest) for _ in tap.leaves])
             for name, tap in taps.items()}
    if chain_tap is not None:
        leaf_grads = {(name, call): next(rest) for name, call, _ in chain_leaves}
        for name in chained:
            calls = chain_tap.collect(name, leaf_grads, device)
            if name == unit.name:
                if len(calls) != len(log.args):
                    raise RuntimeError(
                        f'capture_unit({unit.name!r}): the activation after the unit ran '
                        f'{len(calls)} times for {len(log.args)} calls of the unit')
                per_call = calls
            else:
                later[name] = calls
    return log, per_call, later


@contextlib.contextmanager
def _chain_tapping(tap: ChainTap | None, units: Iterable[ReconUnit]) -> Iterator[None]:
    """Track each unit's output into ``tap`` while the forward runs under it."""
    if tap is None:
        yield
        return

    def hook(name: str) -> Callable:
        def post_hook(mod: nn.Module, args: Any, output: Any) -> None:
            tap.track(name, output)
        return post_hook

    with removing([]) as handles, tap:
        for u in units:
            handles.append(u.module.register_forward_hook(hook(u.name)))
        yield


class _GradientTap:
    """Gradients reaching one module's outputs in a backward, per call.

    An output downstream of the differentiated unit gets a tensor hook; one that is not
    (an FPN lateral conv reading an earlier backbone stage, which the tail run takes from
    the stored prefix) is replaced by a leaf, which the caller adds to the inputs of
    ``torch.autograd.grad`` (:attr:`leaves`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.outputs: list[list[Tensor]] = []
        self.grads: list[dict[int, Tensor]] = []
        self.leaves: dict[tuple[int, int], Tensor] = {}   # (call, tensor) -> leaf

    def post_hook(self, mod: nn.Module, args: Any, output: Any) -> Any:
        call = len(self.outputs)
        found: dict[int, Tensor] = {}
        index = itertools.count()

        def tap(t: Tensor) -> Tensor:
            if not t.is_floating_point():
                return t
            i = next(index)
            if t.requires_grad:
                t.register_hook(functools.partial(_store, found, i))
            else:
                t = self.leaves[(call, i)] = t.detach().requires_grad_(True)
            # pass on a copy: an in-place op after the module would move the hooked tensor
            return t.clone()

        passed = tree_map(tap, output)
        self.outputs.append(float_tensors(output))
        self.grads.append(found)
        return passed

    def collect(self, leaf_grads: Sequence[Tensor | None]) -> list[list[Tensor]]:
        """Per call, the gradients of the output's float tensors (zeros where none
        arrived); ``leaf_grads``: ``autograd.grad``'s results for :attr:`leaves`, in order."""
        for (call, i), grad in zip(self.leaves, leaf_grads):
            if grad is not None:
                self.grads[call][i] = grad
        return [[found[i].detach().to(self.device) if i in found else
                 torch.zeros_like(t, device=self.device) for i, t in enumerate(tensors)]
                for tensors, found in zip(self.outputs, self.grads)]


def _store(found: dict[int, Tensor], index: int, grad: Tensor) -> None:
    found[index] = grad


@contextlib.contextmanager
def _gradient_taps(units: Sequence[ReconUnit], device: torch.device
                   ) -> Iterator[dict[str, _GradientTap]]:
    taps = {unit.name: _GradientTap(device) for unit in units}
    with removing([]) as handles:
        for unit in units:
            handles.append(unit.module.register_forward_hook(taps[unit.name].post_hook))
        yield taps
