"""Reconstruction units: residual blocks inside the block scopes, single layers elsewhere."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from mmengine.logging import MMLogger
from torch import Tensor, nn

from ..quant import QuantModule, eval_mode, iter_quant_modules
from ._utils import quant_disabled, requires_grad
from .activation import ChainProbe, PostChain
from .trace import CallRecord, ForwardFn, trace_calls

# autograd nodes an activation / element-wise unary op leaves after a residual addition
_UNARY_NODES = frozenset({
    'ReluBackward', 'SiluBackward', 'GeluBackward', 'HardtanhBackward', 'HardswishBackward',
    'HardsigmoidBackward', 'LeakyReluBackward', 'EluBackward', 'MishBackward',
    'SigmoidBackward', 'TanhBackward', 'ClampBackward', 'ClampMinBackward',
    'ClampMaxBackward', 'CloneBackward', 'MulBackward'})
_ADD_NODES = frozenset({'AddBackward'})


@dataclass
class ReconUnit:
    """A module reconstructed as a whole.

    Attributes:
        name: fully qualified module name.
        module: the module (a residual block, or a single quantized wrapper).
        kind: ``'block'`` or ``'layer'``.
        layers: ``(name, wrapper)`` of the quantized wrappers inside, in module order
            (for a layer unit: the wrapper itself).
        num_calls: calls of ``module`` per forward (a head conv shared across FPN levels
            is called once per level; its cache holds every call).
        post: the ops that follow a layer unit's module in the model (its norm and
            activation, :mod:`.activation`): the unit's output, the one reconstructed, is
            ``post(module(x))``. Empty for blocks (their output already ends in the
            activation after the residual addition) and for layers with no activation.
    """

    name: str
    module: nn.Module
    kind: str
    layers: list[tuple[str, QuantModule]] = field(default_factory=list)
    num_calls: int = 1
    post: PostChain = field(default_factory=PostChain)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The unit's output: ``post(module(*args, **kwargs))``."""
        return self.post(self.module(*args, **kwargs))

    def set_quant(self, enabled: bool) -> None:
        """Switch weight and input quantization of all layers of the unit."""
        for _, layer in self.layers:
            layer.set_quant(weight=enabled, input=enabled)

    def __repr__(self) -> str:
        post = f', post={self.post.describe()!r}' if self.post else ''
        return (f'ReconUnit({self.name!r}, kind={self.kind!r}, layers={len(self.layers)}, '
                f'num_calls={self.num_calls}{post})')


def top_quant_layers(model: nn.Module) -> list[tuple[str, QuantModule]]:
    """Quantized wrappers of ``model`` that are not nested inside another wrapper."""
    out: list[tuple[str, QuantModule]] = []
    for name, module in iter_quant_modules(model):
        if not any(name.startswith(outer + '.') for outer, _ in out):
            out.append((name, module))
    return out


def _node_kind(node: Any) -> str:
    return type(node).__name__.rstrip('0123456789')


def ends_in_residual_add(output: Any) -> bool:
    """Whether ``output``'s autograd history ends, through unary ops, at an addition.

    Args:
        output: a module output; only a tensor with a ``grad_fn`` can qualify.
    """
    if not isinstance(output, Tensor) or output.grad_fn is None:
        return False
    node = output.grad_fn
    while node is not None and _node_kind(node) in _UNARY_NODES:
        parents = [n for n, _ in node.next_functions if n is not None]
        # a binary Mul (gating, x * sigmoid(x)) is no unary op
        if _node_kind(node) == 'MulBackward' and len(parents) != 1:
            return False
        node = parents[0] if parents else None
    return node is not None and _node_kind(node) in _ADD_NODES


def _in_scopes(name: str, scopes: Sequence[str]) -> bool:
    return any(name == s or name.startswith(s + '.') for s in scopes)


def find_units(model: nn.Module, forward_fn: ForwardFn, batch: Any,
               block_scopes: Sequence[str] = ('backbone',),
               with_activation: bool = True) -> list[ReconUnit]:
    """Find the reconstruction units of a quantized model from one forward.

    Inside ``block_scopes`` a block is a minimal module whose output ends (through
    activations) in a residual addition and that holds at least one quantized wrapper.
    Every quantized wrapper outside the blocks is a layer unit; with ``with_activation``
    its output is taken after the norm / activation that follows it (QDrop's and
    AdaRound's unit: ``act(conv(x))``, :mod:`.activation`). The probe forward runs in eval
    mode with quantization off and gradients on (parameters temporarily require grad);
    modes, switches and flags are restored.

    Args:
        model: a model converted by ``quantize_model``.
        forward_fn: ``forward_fn(model, batch)`` runs the model.
        batch: one calibration batch.
        block_scopes: module-name prefixes searched for blocks; ``()`` = layer-wise.
        with_activation: layer units end after the activation that follows the layer;
            False: at the layer's own output (before its activation).

    Returns:
        Units ordered by their first call. A wrapper never called by the forward is no
        unit (a warning names it).

    Raises:
        ValueError: the model has no quantized wrapper.
    """
    layers = top_quant_layers(model)
    if not layers:
        raise ValueError('find_units: the model has no quantized layer '
                         '(run quantize_model first)')
    candidates: set[str] = set()
    probe = ChainProbe()
    top = {name for name, _ in layers}

    def on_output(record: CallRecord, output: Any) -> None:
        if with_activation and record.name in top:
            probe.track(record.name, output)
        if (record.index == 0 and _in_scopes(record.name, block_scopes)
                and not isinstance(record.module, QuantModule)
                and ends_in_residual_add(output)):
            candidates.add(record.name)

    with eval_mode(model), quant_disabled(model), requires_grad(model.parameters(), True), \
            torch.enable_grad():
        with probe if with_activation else contextlib.nullcontext():
            records, outputs = trace_calls(model, forward_fn, batch,
                                           is_leaf=lambda m: isinstance(m, QuantModule),
                                           on_output=on_output)
    probe.returned(outputs)
    chains = probe.chains() if with_activation else {}

    def layers_under(prefix: str) -> list[tuple[str, QuantModule]]:
        return [(n, m) for n, m in layers if n.startswith(prefix + '.')]

    candidates = {c for c in candidates if layers_under(c)}
    blocks = [c for c in candidates
              if not any(o != c and o.startswith(c + '.') for o in candidates)]
    first: dict[str, CallRecord] = {}
    calls: dict[str, int] = {}
    for record in records:
        first.setdefault(record.name, record)
        calls[record.name] = calls.get(record.name, 0) + 1

    modules = dict(model.named_modules())
    units = [ReconUnit(name=b, module=modules[b], kind='block', layers=layers_under(b),
                       num_calls=calls[b]) for b in blocks]
    skipped = []
    for name, layer in layers:
        if any(name.startswith(b + '.') for b in blocks):
            continue
        if name not in calls:
            skipped.append(name)
            continue
        units.append(ReconUnit(name=name, module=layer, kind='layer',
                               layers=[(name, layer)], num_calls=calls[name],
                               post=chains.get(name, PostChain())))
    if skipped:
        MMLogger.get_current_instance().warning(
            f'find_units: {len(skipped)} quantized layers never ran in the forward and '
            f'are not calibrated: {skipped}')
    units.sort(key=lambda u: first[u.name].start)
    return units
