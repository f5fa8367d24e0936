"""Small model-surgery helpers: find where a module is registered, swap it, eval mode,
hooks that come off when a block ends."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ['module_locations', 'replace_module', 'eval_mode', 'removing']


def module_locations(model: nn.Module, target: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """Every place ``target`` is registered as a child.

    Returns:
        ``(parent, child_name, fully_qualified_name)`` for each registration; a module shared
        by several parents (or under several names) appears once per registration.
    """
    found: dict[tuple[int, str], tuple[nn.Module, str, str]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is target and (id(parent), child_name) not in found:
                fqn = f'{parent_name}.{child_name}' if parent_name else child_name
                found[(id(parent), child_name)] = (parent, child_name, fqn)
    return list(found.values())


def replace_module(model: nn.Module, target: nn.Module, new: nn.Module) -> list[str]:
    """Register ``new`` wherever ``target`` is registered (``setattr`` on each parent).

    Properties that resolve a child by its registered name (mmdet's ``norm1`` →
    ``getattr(self, self.norm1_name)``) see the new module too.

    Returns:
        The fully-qualified names that were replaced.

    Raises:
        ValueError: if ``target`` is ``model`` itself or not inside ``model``.
    """
    if target is model:
        raise ValueError(f'cannot swap the root module {type(model).__name__} in place; '
                         'wrap it in a container (e.g. nn.Sequential)')
    locations = module_locations(model, target)
    if not locations:
        raise ValueError(f'{type(target).__name__} is not a submodule of {type(model).__name__}')
    for parent, child_name, _ in locations:
        setattr(parent, child_name, new)
    return [fqn for _, _, fqn in locations]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def removing(handles: list[RemovableHandle]) -> Iterator[list[RemovableHandle]]:
    """Remove the hook handles appended to ``handles`` when the block ends, even on error,
    so a failed forward never leaves a hook behind on the user's model."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()
