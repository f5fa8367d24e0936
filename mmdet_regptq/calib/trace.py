"""Recording the module calls of one forward pass, and stopping a forward early.

``trace_calls`` gives every module call of a forward with a start and an end counter, so
that call nesting ("call A encloses call B") and order ("A finished before B started")
are plain integer comparisons. It is the common ground of :func:`find_units` (execution
order of the units) and :class:`TailRunner` (which calls precede a unit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..quant.utils import removing

ForwardFn = Callable[[nn.Module, Any], Any]


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the wanted values are captured."""


@dataclass
class CallRecord:
    """One call of one module during a traced forward.

    Attributes:
        name: fully qualified module name ('' for the root model).
        module: the module.
        index: how many earlier calls this module had in the same forward (0, 1, ...).
        start: counter value when the call started (its pre-hook ran).
        end: counter value when it returned (-1 if it never returned).
    """

    name: str
    module: nn.Module
    index: int
    start: int
    end: int = -1

    def encloses(self, other: 'CallRecord') -> bool:
        """Whether ``other`` ran inside this call."""
        return self.start < other.start and other.end < self.end


def run_forward(model: nn.Module, forward_fn: ForwardFn, batch: Any) -> tuple[Any, bool]:
    """Run ``forward_fn(model, batch)``, swallowing a :class:`StopForward`.

    Returns:
        ``(outputs, stopped)``: the model outputs (``None`` when stopped early) and whether
        a hook stopped the forward.
    """
    try:
        return forward_fn(model, batch), False
    except StopForward:
        return None, True


def traced_modules(model: nn.Module,
                   is_leaf: Callable[[nn.Module], bool] | None = None
                   ) -> list[tuple[str, nn.Module]]:
    """Named modules of ``model`` that a trace hooks: the children of leaves are skipped.

    Args:
        model: the model.
        is_leaf: modules whose submodules are not traced (the quantized wrappers: their
            quantizers are called or not depending on the quantization state).
    """
    out: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        out.append((name, module))
        if is_leaf is not None and is_leaf(module):
            skip.append(name + '.')
    return out


def trace_calls(model: nn.Module, forward_fn: ForwardFn, batch: Any, *,
                is_leaf: Callable[[nn.Module], bool] | None = None,
                on_output: Callable[[CallRecord, Any], None] | None = None
                ) -> tuple[list[CallRecord], Any]:
    """Run one forward and record every module call.

    Args:
        model: the model.
        forward_fn: ``forward_fn(model, batch)`` runs the model and returns its outputs.
        batch: one calibration batch.
        is_leaf: see :func:`traced_modules`.
        on_output: called as ``on_output(record, output)`` when a call returns.

    Returns:
        ``(records, outputs)``: the calls ordered by start, and the model outputs.
    """
    counter = 0
    records: list[CallRecord] = []
    open_calls: dict[int, list[CallRecord]] = {}
    num_calls: dict[int, int] = {}

    def pre_hook(name: str) -> Callable:
        def hook(mod: nn.Module, args: Any) -> None:
            nonlocal counter
            index = num_calls.get(id(mod), 0)
            num_calls[id(mod)] = index + 1
            record = CallRecord(name=name, module=mod, index=index, start=counter)
            counter += 1
            records.append(record)
            open_calls.setdefault(id(mod), []).append(record)
        return hook

    def post_hook(mod: nn.Module, args: Any, output: Any) -> None:
        nonlocal counter
        record = open_calls[id(mod)].pop()
        record.end = counter
        counter += 1
        if on_output is not None:
            on_output(record, output)

    with removing([]) as handles:
        for name, module in traced_modules(model, is_leaf):
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook))
        outputs = forward_fn(model, batch)
    return records, outputs
