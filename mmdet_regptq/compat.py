"""Fixes the OpenMMLab 2.x stack needs on torch >= 2.6 and numpy 2 (applied on import).

Each fix is small, idempotent, edits nothing on disk, and has a test in
``tests/test_compat.py`` that fails without it.

1. ``torch.load`` defaults to ``weights_only=True`` since torch 2.6, but mmengine 0.10.7
   calls it without the argument. A full training checkpoint written by mmengine's
   ``CheckpointHook`` holds a ``message_hub`` with ``HistoryBuffer`` objects and numpy
   arrays/scalars, which the safe unpickler refuses ("Unsupported global:
   mmengine.logging.history_buffer.HistoryBuffer"), so ``mim run mmdet test cfg ckpt`` and
   ``resume=True`` fail on them. We allow-list exactly those classes (they are plain data
   containers) instead of turning the safe loader off. Bundled checkpoints are stripped to
   ``state_dict`` + plain ``meta`` and load without this.
"""
from __future__ import annotations

import numpy as np
import torch

_applied = False


def checkpoint_safe_globals() -> list:
    """The non-tensor classes found in mmengine training checkpoints."""
    from mmengine.logging.history_buffer import HistoryBuffer

    globals_ = [HistoryBuffer, np.ndarray, np.dtype]
    globals_ += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType')]
    globals_ += [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                 np.uint32, np.uint64, np.float16, np.float32, np.float64]
    multiarray = getattr(np, '_core', None) or np.core
    globals_ += [multiarray.multiarray._reconstruct, multiarray.multiarray.scalar]
    return globals_


def apply() -> None:
    """Apply every fix once per process."""
    global _applied
    if _applied:
        return
    torch.serialization.add_safe_globals(checkpoint_safe_globals())
    _applied = True
