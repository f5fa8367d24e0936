"""Small helpers over nested structures of tensors (tuples, lists, dicts).

Module inputs and outputs in detectors are tensors, tuples/lists of tensors (one per FPN
level) or dicts. These helpers walk such structures; any other object is a leaf that is
passed through unchanged (by reference).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def tree_map(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor of a nested tuple/list/dict structure.

    Args:
        fn: function applied to each tensor leaf.
        obj: a tensor, a (named)tuple / list / dict of such, or any other leaf.

    Returns:
        The same structure with every tensor replaced by ``fn(tensor)``.
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, '_fields'):  # namedtuple
        return type(obj)(*(tree_map(fn, x) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(fn, x) for x in obj)
    if isinstance(obj, dict):
        return type(obj)((k, tree_map(fn, v)) for k, v in obj.items())
    return obj


def tree_tensors(obj: Any) -> list[Tensor]:
    """All tensors of a nested structure, in a deterministic (depth-first) order."""
    out: list[Tensor] = []
    tree_map(out.append, obj)
    return out


def tree_nbytes(obj: Any) -> int:
    """Total bytes of the tensors of a nested structure (storage sharing ignored)."""
    return sum(t.numel() * t.element_size() for t in tree_tensors(obj))


def detach_to(obj: Any, device: torch.device | str) -> Any:
    """Detached copies of all tensors on ``device``, never sharing storage with ``obj``.

    A copy is made even when the tensor already lives on ``device``: cached values must
    not change when the model later modifies a tensor in place (``out += identity``).
    """
    device = torch.device(device)

    def _copy(t: Tensor) -> Tensor:
        t = t.detach()
        return t.clone() if t.device == device else t.to(device)

    return tree_map(_copy, obj)


def float_tensors(obj: Any) -> list[Tensor]:
    """The floating-point tensors of a nested structure (outputs a loss can compare)."""
    return [t for t in tree_tensors(obj) if t.is_floating_point()]
