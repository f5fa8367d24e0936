"""Read checkpoint files without ever running code from them.

A ``.pth`` file is a pickle, and Python's own unpickler calls whatever function the file
names (``os.system``, ``builtins.exec``, ...). Every checkpoint the package reads, and
mmengine's local loader (which importing the package replaces, :mod:`mmdet_regptq.compat`),
go through :func:`load_checkpoint_file`:

1. torch's ``weights_only`` unpickler (tensors and containers; the numpy data classes and
   mmengine's ``HistoryBuffer`` are allow-listed for it by :mod:`mmdet_regptq.compat`);
2. only for a file that step refuses: :class:`RestrictedUnpickler`, a ``pickle.Unpickler``
   whose ``find_class`` admits the explicit allow-list :func:`allowed_globals` (torch's own
   safe globals, numpy data classes, ``HistoryBuffer``) and a ``getattr`` limited to a
   HistoryBuffer's statistics methods (what an mmengine training checkpoint needs). torch's
   legacy (non-zip) reader calls ``pickle_module.load`` as well as ``pickle_module.Unpickler``:
   both are restricted (:data:`restricted_pickle`).

A refused file raises :class:`UnsafeCheckpointError` naming the file and the global; a
file that is not a readable torch checkpoint raises :class:`CorruptCheckpointError`.
"""
from __future__ import annotations

import _compat_pickle
import os
import os.path as osp
import pickle
import types
from typing import Any

import numpy as np
import torch

__all__ = ['load_checkpoint_file', 'checkpoint_problem', 'allowed_globals',
           'checkpoint_safe_globals', 'RestrictedUnpickler', 'restricted_pickle',
           'UnsafeCheckpointError', 'CorruptCheckpointError']


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asks for a Python global outside the allow-list (it could run code)."""

    def __init__(self, path: str, global_name: str) -> None:
        self.path, self.global_name = path, global_name
        super().__init__(
            f'refusing to load {path!r}: it asks for the Python global {global_name!r}, which '
            'is not on the allow-list of checkpoint contents (torch tensors and containers, '
            'numpy arrays and scalars, mmengine HistoryBuffer); unpickling it could run '
            'arbitrary code. Only load checkpoints from a source you trust, re-saved as a '
            'plain state_dict.')


class CorruptCheckpointError(ValueError):
    """The file is truncated, corrupt or not a torch checkpoint."""


class _Refused(pickle.UnpicklingError):
    def __init__(self, global_name: str) -> None:
        self.global_name = global_name
        super().__init__(f'checkpoint global {global_name} is not allowed')


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


def history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to what a pickled HistoryBuffer needs."""
    from mmengine.logging.history_buffer import HistoryBuffer

    is_buffer = obj is HistoryBuffer or isinstance(obj, HistoryBuffer)
    if is_buffer and name in _HISTORY_BUFFER_STATISTICS | set(HistoryBuffer._statistics_methods):
        return getattr(obj, name)
    raise _Refused(f'getattr({getattr(obj, "__name__", type(obj).__name__)}, {name!r}) '
                   '(only the statistics methods of mmengine HistoryBuffer are allowed)')


def allowed_globals() -> dict[str, Any]:
    """The explicit allow-list of :class:`RestrictedUnpickler`: ``'module.name' -> object``."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())  # torch's own: tensors, storages, dtypes, ...
    allowed.update({f'{g.__module__}.{g.__qualname__}': g for g in checkpoint_safe_globals()})
    allowed['builtins.getattr'] = history_buffer_getattr
    return allowed


def _canonical(module: str, name: str) -> tuple[str, str]:
    """Python 2 names of protocol-2 pickles (``__builtin__``), numpy 1.x ``numpy.core``."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    if module == 'numpy.core' or module.startswith('numpy.core.'):
        module = 'numpy._core' + module[len('numpy.core'):]
    return module, name


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the globals of :func:`allowed_globals`."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _canonical(module, name)
        allowed = allowed_globals()
        key = f'{module}.{name}'
        if key in allowed:
            return allowed[key]
        raise _Refused(key)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: The ``pickle_module`` handed to ``torch.load``: both entry points torch uses are restricted.
restricted_pickle = types.SimpleNamespace(Unpickler=RestrictedUnpickler, load=_restricted_load,
                                          UnpicklingError=pickle.UnpicklingError,
                                          __name__='mmdet_regptq.safe_load.restricted_pickle')


def load_checkpoint_file(filename: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load`` of a checkpoint file that can never run code from the file.

    Args:
        filename: a local file (zip or legacy torch format).
        map_location: as for ``torch.load``.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file asks for a global outside :func:`allowed_globals`.
        CorruptCheckpointError: truncated, corrupt or not a torch checkpoint.
    """
    path = osp.expanduser(os.fspath(filename))
    if not osp.isfile(path):
        raise FileNotFoundError(f'{path} can not be found.')
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            pass   # e.g. a HistoryBuffer's getattr: retry with the allow-list below
        try:
            return torch.load(path, map_location=map_location, weights_only=False,
                              pickle_module=restricted_pickle)
        except _Refused as err:
            raise UnsafeCheckpointError(path, err.global_name) from None
    except (UnsafeCheckpointError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - zip/pickle/torch readers raise many types
        first = (str(err).strip().splitlines() or [''])[0][:200]
        raise CorruptCheckpointError(
            f'{path!r} cannot be read as a torch checkpoint (truncated, corrupt or another '
            f'kind of file): {type(err).__name__}: {first}') from None


def checkpoint_problem(path: str | os.PathLike | None) -> str | None:
    """Why ``path`` cannot be loaded (missing, corrupt, unsafe), or None when it loads.

    For command-line tools: the reason is one line, without a traceback.
    """
    if path is None:
        return None
    try:
        load_checkpoint_file(path, map_location='cpu')
    except (FileNotFoundError, CorruptCheckpointError, UnsafeCheckpointError) as err:
        return str(err)
    return None
