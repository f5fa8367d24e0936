"""Fixes the OpenMMLab 2.x stack needs on torch >= 2.6 and numpy 2 (applied on import).

Each fix is small, idempotent, edits nothing on disk, and has a test in
``tests/test_compat.py`` that fails without it.

1. **Training checkpoints and ``weights_only``.** torch >= 2.6 loads with
   ``weights_only=True`` by default, but mmengine 0.10.7 calls ``torch.load`` without the
   argument. A checkpoint written by mmengine's ``CheckpointHook`` holds a
   ``message_hub`` of ``HistoryBuffer`` objects with numpy arrays, and a HistoryBuffer
   pickles its statistics methods by reference (``getattr(HistoryBuffer, 'mean')``), so the safe
   unpickler refuses it and ``mim run mmdet test cfg epoch_N.pth`` or ``resume=True``
   fail. The decision: we do NOT turn safety off. (a) numpy data classes and
   ``HistoryBuffer`` are allow-listed for torch's safe unpickler; (b) mmengine's local
   checkpoint loader is replaced by one that tries the safe loader first and, only for
   files it refuses, uses a restricted unpickler that admits torch's own safe globals,
   those data classes, and ``getattr`` *only* for a HistoryBuffer's statistics methods.
   Any other global still raises. Bundled checkpoints are stripped to ``state_dict`` +
   plain ``meta`` and load without any of this.

2. **MMEngine's distributed launcher on a CPU-only machine.** ``--launcher pytorch``
   (torchrun, gloo) calls ``torch.cuda.set_device(LOCAL_RANK)`` before
   ``init_process_group`` and wraps the model in DDP with ``device_ids=[LOCAL_RANK]``;
   without CUDA the first raises and torch's DDP refuses device ids for a CPU module.
   Only when CUDA is unavailable: the process group is initialised without
   ``set_device`` and DDP gets ``device_ids=None`` (what torch asks for CPU modules).
   With CUDA both are left exactly as mmengine wrote them.
"""
from __future__ import annotations

import os.path as osp
import pickle
import types
from typing import Any

import numpy as np
import torch

_applied = False


def checkpoint_safe_globals() -> list:
    """The non-tensor data classes found in mmengine training checkpoints."""
    from mmengine.logging.history_buffer import HistoryBuffer

    globals_ = [HistoryBuffer, np.ndarray, np.dtype]
    globals_ += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType')]
    globals_ += [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                 np.uint32, np.uint64, np.float16, np.float32, np.float64]
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    globals_ += [multiarray._reconstruct, multiarray.scalar]
    return globals_


#: The statistics a HistoryBuffer pickles by reference (mmengine 0.10.7).
_HISTORY_BUFFER_STATISTICS = {'min', 'max', 'current', 'mean'}


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to what a pickled HistoryBuffer needs."""
    from mmengine.logging.history_buffer import HistoryBuffer

    is_buffer = obj is HistoryBuffer or isinstance(obj, HistoryBuffer)
    if is_buffer and name in _HISTORY_BUFFER_STATISTICS | set(HistoryBuffer._statistics_methods):
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({type(obj).__name__}, {name!r}); only the statistics '
        f'methods of mmengine HistoryBuffer are allowed')


class _CheckpointUnpickler(pickle.Unpickler):
    """Admits torch's safe globals, numpy/HistoryBuffer data and a guarded getattr."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (('builtins', 'getattr'), ('__builtin__', 'getattr')):
            return _history_buffer_getattr
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = _get_allowed_globals()
        allowed.update({f'{g.__module__}.{g.__name__}': g for g in checkpoint_safe_globals()})
        allowed['_codecs.encode'] = __import__('_codecs').encode
        key = f'{module}.{name}'
        if key in allowed:
            return allowed[key]
        if module.startswith('numpy') and f'numpy.{name}' in allowed:  # numpy.core alias
            return allowed[f'numpy.{name}']
        raise pickle.UnpicklingError(f'checkpoint global {key} is not allowed')


_restricted_pickle = types.SimpleNamespace(Unpickler=_CheckpointUnpickler, load=pickle.load,
                                           __name__='mmdet_regptq_restricted_pickle')


def load_local_checkpoint(filename: str, map_location: Any = None) -> Any:
    """mmengine's local loader, safe on torch >= 2.6 for mmengine training checkpoints."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(filename, map_location=map_location, weights_only=False,
                          pickle_module=_restricted_pickle)


def _init_dist_pytorch_cpu(original: Any) -> Any:
    """mmengine's ``_init_dist_pytorch`` without ``torch.cuda.set_device`` on CPU hosts."""
    import torch.distributed as torch_dist

    def init(backend: str, init_backend: str = 'torch', **kwargs: Any) -> None:
        if torch.cuda.is_available() or init_backend != 'torch':
            return original(backend, init_backend=init_backend, **kwargs)
        torch_dist.init_process_group(backend=backend, **kwargs)

    init.__wrapped__ = original
    return init


def _ddp_init_cpu(original: Any) -> Any:
    """``MMDistributedDataParallel.__init__`` with ``device_ids=None`` on CPU hosts."""

    def init(self: Any, module: Any, detect_anomalous_params: bool = False,
             **kwargs: Any) -> None:
        if not torch.cuda.is_available() and kwargs.get('device_ids') is not None:
            kwargs['device_ids'] = None
        original(self, module, detect_anomalous_params, **kwargs)

    init.__wrapped__ = original
    return init


def apply() -> None:
    """Apply every fix once per process."""
    global _applied
    if _applied:
        return
    from mmengine.runner.checkpoint import CheckpointLoader

    torch.serialization.add_safe_globals(checkpoint_safe_globals())
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_local_checkpoint)

    import mmengine.dist.utils as dist_utils
    from mmengine.model.wrappers import MMDistributedDataParallel
    dist_utils._init_dist_pytorch = _init_dist_pytorch_cpu(dist_utils._init_dist_pytorch)
    MMDistributedDataParallel.__init__ = _ddp_init_cpu(MMDistributedDataParallel.__init__)
    _applied = True
