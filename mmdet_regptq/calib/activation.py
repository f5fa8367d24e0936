"""The activation that follows a layer: found once, then part of the layer's unit.

QDrop, AdaRound and BRECQ reconstruct a layer's output *after* its activation
(``relu(conv(x))``; mmcv's ``ConvModule`` conv → norm → act, YOLOv5's ``Conv`` conv → BN →
SiLU): the negative outputs a ReLU discards cost nothing there. With BN folded, the module
that a quantized wrapper replaces is only the conv, so the ops that follow it are found
from one probe forward and kept as a :class:`PostChain` of the unit:

* a chain is the ops applied, in order, to the layer's output and to nothing else: zero or
  more normalisations (an unfolded GroupNorm), then one activation;
* each op must read the previous tensor as its first argument, unmodified since it was
  produced, and be its first consumer; an out-of-place op also its only one (an FPN
  output that is both returned and ReLU'd for the extra convs keeps no chain);
* ops are recognised by name whether they come from a module (``nn.ReLU``, ``nn.SiLU``,
  ``nn.GroupNorm``, mmcv's activations) or a functional call (``F.relu``), through a
  ``TorchFunctionMode``. ``sigmoid`` / ``tanh`` are left out: after a layer they are a
  prediction's output transform, not a hidden activation.

In-place ops are replayed out of place, so a unit's output can be recomputed from the
layer's output while the model's own in-place activation runs on a copy.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ._tree import tree_tensors

__all__ = ['PostOp', 'PostChain', 'ChainProbe', 'ChainTap', 'ACTIVATIONS', 'NORMS']

#: names of activation functions a chain ends with (trailing ``_`` = in place)
ACTIVATIONS = frozenset({
    'relu', 'relu6', 'silu', 'gelu', 'hardswish', 'hardsigmoid', 'leaky_relu', 'elu',
    'selu', 'celu', 'mish', 'hardtanh', 'softplus', 'prelu', 'rrelu'})
#: names of normalisations a chain may pass before its activation
NORMS = frozenset({'group_norm', 'layer_norm', 'batch_norm', 'instance_norm'})
#: calls that read a tensor's metadata, not its values (no consumers)
_META = frozenset({
    '__get__', 'size', 'dim', 'numel', 'stride', 'is_contiguous', 'is_floating_point',
    'element_size', 'data_ptr', 'get_device', '__len__', '__repr__', '__format__',
    '__hash__', 'type', 'requires_grad_', 'register_hook', 'storage_offset', 'nelement',
    'ndimension', 'is_complex', 'untyped_storage', '_version', 'retain_grad'})


def _name(func: Callable) -> str:
    return getattr(func, '__name__', '')


def _kind(func: Callable) -> str | None:
    name = _name(func).rstrip('_')
    if name in ACTIVATIONS:
        return 'act'
    if name in NORMS:
        return 'norm'
    return None


def _out_of_place(func: Callable) -> Callable:
    """``F.relu_`` → ``F.relu``, ``Tensor.relu_`` → ``Tensor.relu`` (others unchanged)."""
    name = _name(func)
    if not name.endswith('_') or name.endswith('__'):
        return func
    for owner in (F, torch, torch.Tensor):
        if getattr(owner, name, None) is func and hasattr(owner, name[:-1]):
            return getattr(owner, name[:-1])
    return func


def _detached(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(x) for x in obj)
    return obj


@dataclass(frozen=True)
class PostOp:
    """One op of a chain: ``func(x, *args, **kwargs)``, out of place.

    Tensors among ``args`` / ``kwargs`` (a GroupNorm's affine parameters) are detached
    views: they follow the model's values but take no gradient.
    """

    func: Callable
    args: tuple
    kwargs: dict
    kind: str

    @classmethod
    def from_call(cls, func: Callable, args: tuple, kwargs: dict, kind: str) -> PostOp:
        kwargs = {k: _detached(v) for k, v in kwargs.items()}
        if 'inplace' in kwargs:
            kwargs['inplace'] = False
        return cls(_out_of_place(func), tuple(_detached(a) for a in args[1:]), kwargs, kind)

    @property
    def name(self) -> str:
        return _name(self.func)

    def __call__(self, x: Tensor) -> Tensor:
        return self.func(x, *self.args, **self.kwargs)


@dataclass(frozen=True)
class PostChain:
    """The ops a unit applies to its module's output (empty: none)."""

    ops: tuple[PostOp, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __call__(self, output: Any) -> Any:
        """Apply the chain to a tensor output (other outputs pass unchanged)."""
        if not self.ops or not isinstance(output, Tensor):
            return output
        for op in self.ops:
            output = op(output)
        return output

    def describe(self) -> str:
        return ' -> '.join(op.name for op in self.ops)


class _Probe:
    """Chain state of one tracked tensor."""

    __slots__ = ('owner', 'call', 'tensor', 'version', 'ops')

    def __init__(self, owner: str, call: int, tensor: Tensor) -> None:
        self.owner, self.call, self.tensor = owner, call, tensor
        self.version = tensor._version
        self.ops: list[PostOp] = []


class ChainProbe(TorchFunctionMode):
    """Finds the :class:`PostChain` of each tracked layer during one forward.

    Call :meth:`track` from the layer's forward hook with its output; after the forward,
    :meth:`chains` gives ``{name: PostChain}`` (empty where no valid chain follows, or the
    calls of one layer disagree).
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, _Probe] = {}
        self._watched: dict[int, tuple[Tensor, _Probe]] = {}
        # per layer and call: the ops found so far; None: a non-tensor output
        self._done: dict[str, list[tuple[PostOp, ...] | None]] = {}

    def track(self, name: str, output: Any) -> None:
        """Start following ``output`` (a tensor) of layer ``name``."""
        calls = self._done.setdefault(name, [])
        if not isinstance(output, Tensor):
            calls.append(None)
            return
        probe = _Probe(name, len(calls), output)
        calls.append(())
        self._live[id(output)] = probe

    def _finish(self, probe: _Probe, ops: tuple[PostOp, ...]) -> None:
        self._done[probe.owner][probe.call] = ops

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _name(func) in _META:
            return func(*args, **kwargs)
        readers = [t for t in tree_tensors((list(args), kwargs))
                   if id(t) in self._live or id(t) in self._watched]
        versions = [t._version for t in readers]   # an in-place op bumps them
        out = func(*args, **kwargs)
        for t, version in zip(readers, versions):
            watched = self._watched.pop(id(t), None)
            if watched is not None and watched[0] is t:   # a second reader: no chain
                self._finish(watched[1], ())
                continue
            probe = self._live.get(id(t))
            if probe is None or probe.tensor is not t:
                continue
            del self._live[id(t)]
            kind = _kind(func)
            if (kind is None or args[0] is not t or version != probe.version
                    or not isinstance(out, Tensor)):
                self._finish(probe, ())   # read by another op first (a norm alone: none)
                continue
            probe.ops.append(PostOp.from_call(func, tuple(args), kwargs, kind))
            if out is not t:   # out of place: the input must have no later reader
                self._watched[id(t)] = (t, probe)
            if kind == 'act':
                self._finish(probe, tuple(probe.ops))
            else:
                probe.tensor, probe.version = out, out._version
                self._live[id(out)] = probe
        return out

    def returned(self, outputs: Any) -> None:
        """The model's outputs: a chain input among them has a second reader (the caller)."""
        for t in tree_tensors(outputs):
            watched = self._watched.pop(id(t), None)
            if watched is not None and watched[0] is t:
                self._finish(watched[1], ())

    def chains(self) -> dict[str, PostChain]:
        """``{layer name: chain}`` after the forward: empty where a call of the layer has
        none (or a chain left without its activation) or the calls disagree."""
        out = {}
        for name, calls in self._done.items():
            first = calls[0] if calls else None
            same = all(c is not None and _same_ops(c, first) for c in calls)
            out[name] = PostChain(tuple(first) if same and first else ())
        return out


def _same_ops(a: tuple[PostOp, ...], b: tuple[PostOp, ...] | None) -> bool:
    return b is not None and [(o.func, o.kind) for o in a] == [(o.func, o.kind) for o in b]


class ChainTap(TorchFunctionMode):
    """Taps the end of each tracked layer's chain during a forward with gradients.

    The value the chain's last op returns is replaced by a leaf requiring grad when it has
    no graph (the layer being captured: its inputs and parameters take no gradient), or by
    a copy with a gradient hook otherwise (a later layer downstream of it); either way
    :meth:`collect` gives, per layer and call, ``dL/d(post-activation output)``.
    """

    def __init__(self, chains: dict[str, PostChain]) -> None:
        super().__init__()
        self.chains = chains
        self._live: dict[int, tuple[Tensor, str, int, int]] = {}
        self.outputs: dict[str, list[Tensor]] = {name: [] for name in chains}
        self.leaves: dict[str, dict[int, Tensor]] = {name: {} for name in chains}
        self._grads: dict[str, dict[int, Tensor]] = {name: {} for name in chains}

    def track(self, name: str, output: Any) -> None:
        if isinstance(output, Tensor):
            self._live[id(output)] = (output, name, len(self.outputs[name]), 0)

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._live or not args or not isinstance(args[0], Tensor):
            return out
        entry = self._live.get(id(args[0]))
        if entry is None or entry[0] is not args[0]:
            return out
        tensor, name, call, step = entry
        ops = self.chains[name].ops
        if _out_of_place(func) is not ops[step].func and func is not ops[step].func:
            return out
        del self._live[id(args[0])]
        if step + 1 < len(ops):
            self._live[id(out)] = (out, name, call, step + 1)
            return out
        self.outputs[name].append(out.detach())
        if out.requires_grad:
            out = out.clone()
            out.register_hook(functools.partial(_store, self._grads[name], call))
        else:
            out = out.detach().clone().requires_grad_(True)
            self.leaves[name][call] = out
        return out

    def leaf_list(self) -> list[tuple[str, int, Tensor]]:
        """The leaves to pass to ``torch.autograd.grad``, in a fixed order."""
        return [(name, call, leaf) for name, calls in self.leaves.items()
                for call, leaf in sorted(calls.items())]

    def collect(self, name: str, leaf_grads: dict[tuple[str, int], Tensor | None],
                device: torch.device) -> list[list[Tensor]]:
        """Per call of ``name``, ``[dL/dO]`` (zeros where no gradient arrived)."""
        out = []
        for call, value in enumerate(self.outputs[name]):
            grad = self._grads[name].get(call, leaf_grads.get((name, call)))
            out.append([grad.detach().to(device) if grad is not None
                        else torch.zeros_like(value, device=device)])
        return out


def _store(found: dict[int, Tensor], index: int, grad: Tensor) -> None:
    found[index] = grad


def iter_chain_names(chains: dict[str, PostChain]) -> Iterator[str]:
    """Names of the layers with a non-empty chain."""
    return (name for name, chain in chains.items() if chain)
