"""Read an Ultralytics YOLOv5 release ``.pt`` without the yolov5 code and without running
pickled code: a restricted unpickler with an allow-list.

A release checkpoint is a full pickle of the yolov5 repository's ``models.yolo.Model``.
Every class it names is either a tensor-rebuilding function of torch, a container, or a
module class; module classes (yolov5's and ``torch.nn``'s) become inert :class:`Stub`
objects that only keep their ``__dict__``, from which :func:`stub_state_dict` collects the
tensors. Any other global (``os.system``, ``builtins.eval``, ...) is refused by name.
"""
from __future__ import annotations

import collections
import pickle
import types
from pathlib import Path
from typing import Any

import torch
import torch._utils

__all__ = ['Stub', 'RestrictedUnpickler', 'load_release_checkpoint', 'stub_state_dict',
           'ALLOWED_MODULE_CLASSES']

#: Module classes mapped to stand-ins (yolov5 v6 + the torch.nn layers it uses).
ALLOWED_MODULE_CLASSES = frozenset({
    'models.yolo.Model', 'models.yolo.Detect',
    'models.common.Conv', 'models.common.DWConv', 'models.common.Bottleneck',
    'models.common.BottleneckCSP', 'models.common.C3', 'models.common.SPP',
    'models.common.SPPF', 'models.common.Focus', 'models.common.Concat',
    'torch.nn.modules.conv.Conv2d', 'torch.nn.modules.batchnorm.BatchNorm2d',
    'torch.nn.modules.activation.SiLU', 'torch.nn.modules.activation.LeakyReLU',
    'torch.nn.modules.activation.Hardswish', 'torch.nn.modules.pooling.MaxPool2d',
    'torch.nn.modules.upsampling.Upsample', 'torch.nn.modules.container.Sequential',
    'torch.nn.modules.container.ModuleList', 'torch.nn.modules.linear.Identity',
})

#: Plain functions / types the pickle may call: tensor rebuilding and containers.
_ALLOWED_CALLABLES = {
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('__builtin__', 'set'): set,
    ('torch', 'Size'): torch.Size,
}


class Stub:
    """Inert stand-in for a pickled module object: keeps its state, runs nothing."""

    #: the original qualified class name (``models.common.C3``)
    qualname = ''

    def __setstate__(self, state: Any) -> None:
        self.__dict__['state'] = state if isinstance(state, dict) else {'_state': state}

    def __repr__(self) -> str:
        return f'Stub({self.qualname})'


_STUB_TYPES: dict[str, type] = {}


def _stub_type(qualname: str) -> type:
    if qualname not in _STUB_TYPES:
        _STUB_TYPES[qualname] = type(qualname.rsplit('.', 1)[-1], (Stub,), {'qualname': qualname})
    return _STUB_TYPES[qualname]


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` resolving only allow-listed globals.

    Raises:
        pickle.UnpicklingError: naming the refused ``module.name``.
    """

    def find_class(self, module: str, name: str) -> Any:
        qualname = f'{module}.{name}'
        if (module, name) in _ALLOWED_CALLABLES:
            return _ALLOWED_CALLABLES[(module, name)]
        if qualname in ALLOWED_MODULE_CLASSES:
            return _stub_type(qualname)
        raise pickle.UnpicklingError(
            f"refusing to unpickle '{qualname}': not on the YOLOv5 checkpoint allow-list "
            '(tensor rebuilding, OrderedDict/set and the yolov5 / torch.nn module classes); '
            'the file is not an Ultralytics YOLOv5 release checkpoint or it carries code')


def _restricted_pickle_module() -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose every load is restricted."""
    module = types.ModuleType('yolov5_restricted_pickle')
    module.Unpickler = RestrictedUnpickler
    module.load = lambda f, **kwargs: RestrictedUnpickler(f, **kwargs).load()
    module.__dict__['UnpicklingError'] = pickle.UnpicklingError
    return module


def load_release_checkpoint(path: str | Path) -> Any:
    """Unpickle a YOLOv5 ``.pt`` (zip or legacy format) with :class:`RestrictedUnpickler`."""
    return torch.load(path, map_location='cpu', weights_only=False,
                      pickle_module=_restricted_pickle_module())


def stub_state_dict(root: Stub, prefix: str = '') -> dict[str, torch.Tensor]:
    """``state_dict()`` of a stub module tree: parameters and persistent buffers."""
    state = root.state
    out: dict[str, torch.Tensor] = {}
    for name, value in state.get('_parameters', {}).items():
        if value is not None:
            out[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
    skip = state.get('_non_persistent_buffers_set', set())
    for name, value in state.get('_buffers', {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in state.get('_modules', {}).items():
        if isinstance(child, Stub):
            out.update(stub_state_dict(child, f'{prefix}{name}.'))
    return out
