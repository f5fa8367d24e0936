"""Resumable calibration: the state after each finished unit, written atomically.

A calibration of a large detector takes hours; a killed job (SIGTERM from a scheduler,
an OOM, Ctrl-C) should not start over. After every finished unit
:meth:`CalibrationResume.save` writes ``work_dir/quantized.partial.pth`` (temp file +
rename, so a reader sees the previous complete file or the new one, never half of one).
On the next run with the same work_dir, config, bits, method, seed and calibration images,
:meth:`CalibrationResume.load` finds it and :meth:`CalibrationResume.restore` rebuilds the
finished units (``method.restore_finished``) and loads their state; calibration continues
with ``start_unit = num_finished`` and ends with the same model as an uninterrupted run
(unit ``k`` always reconstructs with seed ``seed + k``). The partial file is removed once
the final checkpoint is written. A partial file made with other settings is ignored
(warning) and overwritten.

SIGTERM during calibration is turned into :class:`CalibrationInterrupted` (a
``SystemExit``) so that clean-up code runs (no ``.tmp`` file is left behind); stale
temporary files of a hard kill (SIGKILL) are removed by the next run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from mmdet_regptq.engine.checkpoint import check_finite
from mmdet_regptq.io import atomic_save
from mmdet_regptq.quant.quantizers import HARD_ALPHA

PARTIAL_NAME = 'quantized.partial.pth'
FINAL_NAME = 'quantized.pth'
PARTIAL_VERSION = 1


class CalibrationInterrupted(SystemExit):
    """Raised in the main thread when the process gets SIGTERM during calibration."""


def fingerprint(*, quant: dict, method: Any, seed: int, batches: Sequence[dict],
                layers: Sequence[tuple[str, Any, Any]], config: str | None = None) -> dict:
    """What must be equal for a partial calibration to be resumed.

    Args:
        quant: the policy fields.
        method: the method config (dict) or object.
        seed: calibration seed.
        batches: the prepared calibration batches (their inputs are hashed).
        layers: ``(name, w_bits, a_bits)`` of every layer of the quantization report.
        config: the config file name, if any.
    """
    digest = hashlib.sha256()
    for batch in batches:
        inputs = batch['inputs'] if isinstance(batch, dict) else batch
        tensors = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        for t in tensors:
            t = t.detach().cpu().contiguous()
            digest.update(str((tuple(t.shape), str(t.dtype))).encode())
            digest.update(t.numpy().tobytes())
    return {
        'quant': _jsonable(quant), 'method': _describe_method(method), 'seed': int(seed),
        'config': config, 'num_batches': len(batches), 'data_sha256': digest.hexdigest(),
        'layers_sha256': hashlib.sha256(repr(list(layers)).encode()).hexdigest()}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _describe_method(method: Any) -> Any:
    if isinstance(method, dict):
        return _jsonable(method)
    return {'type': type(method).__name__,
            'vars': _jsonable({k: v for k, v in vars(method).items() if not k.startswith('_')})}


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class CalibrationResume:
    """Partial calibration state under ``work_dir``.

    Args:
        work_dir: folder of ``quantized.partial.pth``.
        fingerprint: from :func:`fingerprint`; a partial file with another one is ignored.
        logger: where resume decisions are logged.
    """

    def __init__(self, work_dir: str | Path, fingerprint: dict,
                 logger: logging.Logger | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.path = self.work_dir / PARTIAL_NAME
        self.fingerprint = fingerprint
        self.logger = logger or logging.getLogger(__name__)

    # ------------------------------------------------------------------ reading
    def load(self) -> dict | None:
        """The partial state if one matching this run exists, else ``None``.

        Removes stale temporary files of a killed writer first.
        """
        self.remove_stale_tmp()
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location='cpu', weights_only=True)
        except Exception as err:  # noqa: BLE001 - unreadable partial: start over
            self.logger.warning(f'ignoring unreadable partial calibration {self.path}: {err}')
            return None
        if not isinstance(state, dict) or state.get('version') != PARTIAL_VERSION:
            self.logger.warning(f'ignoring {self.path}: not a partial calibration file')
            return None
        diff = _differences(state.get('fingerprint', {}), self.fingerprint)
        if diff:
            self.logger.warning(f'ignoring partial calibration {self.path}: made with other '
                                f'{", ".join(diff)}; starting from the first unit')
            return None
        return state

    def restore(self, model: nn.Module, method: Any, units: Sequence[Any], state: dict) -> int:
        """Rebuild the finished units and load their state; returns ``start_unit``.

        Raises:
            ValueError: the partial file names more finished units than the model has.
        """
        num_finished = int(state['num_finished'])
        if not 0 < num_finished <= len(units):
            raise ValueError(f'{self.path}: num_finished={num_finished} is out of range; '
                             f'allowed 1..{len(units)} for this model')
        method.restore_finished(model, units, num_finished)
        model.load_state_dict(_expand(state), strict=True)
        self.logger.info(f'resuming calibration from {self.path}: units 1..{num_finished} of '
                         f'{len(units)} are done (last: {units[num_finished - 1].name})')
        return num_finished

    # ------------------------------------------------------------------ writing
    def save(self, model: nn.Module, num_finished: int, unit_name: str = '') -> Path:
        """Write the state after ``num_finished`` units (atomic).

        Raises:
            FloatingPointError: the state has NaN/Inf (the previous partial file is kept).
        """
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        check_finite(state, f'partial calibration after unit {num_finished} ({unit_name})')
        floats, signs = _compress(state)
        return atomic_save({'version': PARTIAL_VERSION, 'num_finished': int(num_finished),
                            'fingerprint': self.fingerprint, 'state_dict': floats,
                            'alpha_signs': signs}, self.path)

    def on_unit_end(self, model: nn.Module):
        """A ``calibrate(on_unit_end=...)`` callback saving the state after each unit."""
        def callback(index: int, unit: Any, stats: Any) -> None:
            self.save(model, index + 1, getattr(unit, 'name', ''))
        return callback

    def finish(self) -> None:
        """Remove the partial file (the final checkpoint is written)."""
        self.path.unlink(missing_ok=True)
        self.remove_stale_tmp()

    def remove_stale_tmp(self) -> list[Path]:
        """Delete temporary files a killed writer left in ``work_dir`` (of the partial and of
        the final ``quantized.pth``; ``atomic_save`` names them ``.<name>.<random>.tmp``)."""
        if not self.work_dir.is_dir():
            return []
        stale = [p for name in (PARTIAL_NAME, FINAL_NAME)
                 for p in self.work_dir.glob(f'.{name}.*.tmp')]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale


def _compress(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Hardened AdaRound ``alpha`` tensors (all ±10) stored as sign bits (bool)."""
    floats, signs = {}, {}
    for key, value in state.items():
        if key.endswith('.alpha') and value.is_floating_point() and \
                bool((value.abs() == HARD_ALPHA).all()):
            signs[key] = value > 0
        else:
            floats[key] = value
    return floats, signs


def _expand(state: dict) -> dict[str, Tensor]:
    out = dict(state['state_dict'])
    for key, sign in state.get('alpha_signs', {}).items():
        out[key] = torch.where(sign, HARD_ALPHA, -HARD_ALPHA)
    return out


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`CalibrationInterrupted` in the main thread
    (so ``finally`` clean-up runs); the previous handler is restored afterwards. A no-op
    outside the main thread or when another handler is installed."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise CalibrationInterrupted(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
