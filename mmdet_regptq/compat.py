"""Fixes the OpenMMLab 2.x stack needs on torch >= 2.6 and numpy 2 (applied on import).

Each fix is small, idempotent, edits nothing on disk, and has a test in
``tests/test_compat.py`` that fails without it.

1. **Training checkpoints and ``weights_only``.** torch >= 2.6 loads with
   ``weights_only=True`` by default, but mmengine 0.10.7 calls ``torch.load`` without the
   argument. A checkpoint written by mmengine's ``CheckpointHook`` holds a
   ``message_hub`` of ``HistoryBuffer`` objects with numpy arrays, and a HistoryBuffer
   pickles its statistics methods by reference (``getattr(HistoryBuffer, 'mean')``), so the safe
   unpickler refuses it and ``mim run mmdet test cfg epoch_N.pth`` or ``resume=True``
   fail. The decision: we do NOT turn safety off. (a) numpy data classes, ``HistoryBuffer``
   and a ``getattr`` that returns nothing but a HistoryBuffer's statistics methods are
   allow-listed for torch's safe unpickler (so any ``torch.load(weights_only=True)``
   reads these files, e.g. MMDeploy's); (b) mmengine's local
   checkpoint loader is replaced by :func:`mmdet_regptq.safe_load.load_checkpoint_file`,
   which tries the safe loader first and, only for files it refuses, a restricted
   unpickler (``load`` and ``Unpickler`` both restricted, so torch's legacy non-zip reader
   is covered too) with an explicit allow-list: torch's own safe globals, those data
   classes, and ``getattr`` *only* for a HistoryBuffer's statistics methods. Any other
   global raises :class:`~mmdet_regptq.safe_load.UnsafeCheckpointError` naming the file
   and the global; nothing from the file runs. Bundled checkpoints are stripped to
   ``state_dict`` + plain ``meta`` and load without any of this.

2. **MMEngine's distributed launcher on a CPU-only machine.** ``--launcher pytorch``
   (torchrun, gloo) calls ``torch.cuda.set_device(LOCAL_RANK)`` before
   ``init_process_group`` and wraps the model in DDP with ``device_ids=[LOCAL_RANK]``;
   without CUDA the first raises and torch's DDP refuses device ids for a CPU module.
   Only when CUDA is unavailable: the process group is initialised without
   ``set_device`` and DDP gets ``device_ids=None`` (what torch asks for CPU modules).
   With CUDA both are left exactly as mmengine wrote them.
"""
from __future__ import annotations

from typing import Any

import torch

from mmdet_regptq.safe_load import (checkpoint_safe_globals, history_buffer_getattr,
                                    load_checkpoint_file)

_applied = False


def load_local_checkpoint(filename: str, map_location: Any = None) -> Any:
    """mmengine's local loader: safe on torch >= 2.6 for mmengine training checkpoints, and
    never runs code from the file (see :mod:`mmdet_regptq.safe_load`)."""
    return load_checkpoint_file(filename, map_location=map_location)


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

    torch.serialization.add_safe_globals(
        checkpoint_safe_globals() + [(history_buffer_getattr, 'builtins.getattr')])
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_local_checkpoint)

    import mmengine.dist.utils as dist_utils
    from mmengine.model.wrappers import MMDistributedDataParallel
    dist_utils._init_dist_pytorch = _init_dist_pytorch_cpu(dist_utils._init_dist_pytorch)
    MMDistributedDataParallel.__init__ = _ddp_init_cpu(MMDistributedDataParallel.__init__)
    _applied = True
