"""Resumable calibration: the state after each finished unit, written atomically.

A calibration of a large detector takes hours; a killed job (SIGTERM from a scheduler,
an OOM, Ctrl-C) should not start over. After every finished unit
:meth:`CalibrationResume.save` writes ``work_dir/quantized.partial.pth`` (temp file +
rename, so a reader sees the previous complete file or the new one, never half of one).
On the next run with the same work_dir, config, bits, method, seed, calibration images and
FP weights (a SHA-256 of the float state dict as loaded, :func:`weights_digest`),
:meth:`CalibrationResume.load` finds it and :meth:`CalibrationResume.restore` rebuilds the
finished units (``method.restore_finished``) and loads their state; calibration continues
with ``start_unit = num_finished`` and ends with the same model as an uninterrupted run
(unit ``k`` always reconstructs with seed ``seed + k``). The partial file is removed once
the final checkpoint is written. A partial file made with other settings or other weights
is ignored with a warning naming what differs, and overwritten: a run never mixes models.

The final ``quantized.pth`` records the same fingerprint; a rerun whose fingerprint matches
reuses it (:meth:`CalibrationResume.finished`) instead of calibrating again, so a crash
after calibration (during evaluation) costs only the evaluation.

SIGTERM during calibration is turned into :class:`CalibrationInterrupted` (a
``SystemExit``) so that clean-up code runs (no ``.tmp`` file is left behind); stale
temporary files of a hard kill (SIGKILL) are removed by the next run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from mmdet_regptq.engine.checkpoint import check_finite, read_quantized
from mmdet_regptq.io import atomic_save
from mmdet_regptq.quant.quantizers import HARD_ALPHA
from mmdet_regptq.safe_load import load_checkpoint_file

PARTIAL_NAME = 'quantized.partial.pth'
FINAL_NAME = 'quantized.pth'
PARTIAL_VERSION = 1


class CalibrationInterrupted(SystemExit):
    """Raised in the main thread when the process gets SIGTERM during calibration."""


#: Fingerprint fields as a user reads them in a warning.
_READABLE = {'weights_sha256': 'FP weights (another checkpoint is loaded into the detector)',
             'data_sha256': 'calibration images', 'layers_sha256': 'quantized layers',
             'num_batches': 'number of calibration batches'}


@torch.no_grad()
def weights_digest(model: nn.Module) -> str:
    """SHA-256 of ``model.state_dict()`` (names, dtypes, shapes and bytes), as loaded.

    Two checkpoints give the same digest only when every tensor is bit-identical.
    """
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            continue
        t = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f'{key}|{t.dtype}|{tuple(value.shape)}|'.encode())
        digest.update(t.view(torch.uint8).numpy() if t.numel() else b'')
    return digest.hexdigest()


def fingerprint(*, quant: dict, method: Any, seed: int, batches: Sequence[dict],
                layers: Sequence[tuple[str, Any, Any]], config: str | None = None,
                weights: str | None = None) -> dict:
    """What must be equal for a partial calibration to be resumed (or a finished one reused).

    Args:
        quant: the policy fields.
        method: the method config (dict) or object.
        seed: calibration seed.
        batches: the prepared calibration batches (their inputs are hashed).
        layers: ``(name, w_bits, a_bits)`` of every layer of the quantization report.
        config: the config file name, if any.
        weights: :func:`weights_digest` of the float model as loaded.
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
        'quant': plain_data(quant), 'method': _describe_method(method), 'seed': int(seed),
        'config': config, 'num_batches': len(batches), 'data_sha256': digest.hexdigest(),
        'layers_sha256': hashlib.sha256(repr(list(layers)).encode()).hexdigest(),
        'weights_sha256': weights}


def plain_data(obj: Any) -> Any:
    """``obj`` as JSON data (dicts with str keys, lists, str / numbers / bools / None; any
    other object as its ``str``): what a fingerprint compares and what
    ``torch.load(weights_only=True)`` reads back from a checkpoint's meta."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _describe_method(method: Any) -> Any:
    if isinstance(method, dict):
        return plain_data(method)
    return {'type': type(method).__name__,
            'vars': plain_data({k: v for k, v in vars(method).items() if not k.startswith('_')})}


def _differences(a: dict, b: dict) -> list[str]:
    return [_READABLE.get(k, k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


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
        self.num_saved = 0   # finished units in the partial file (restored or written)

    # ------------------------------------------------------------------ reading
    def load(self, ignore: bool = False) -> dict | None:
        """The partial state if one matching this run exists, else ``None``.

        Removes stale temporary files of a killed writer first.

        Args:
            ignore: start from the first unit whatever the partial file holds
                (``recalibrate=True``); it is overwritten after the first unit.
        """
        self.remove_stale_tmp()
        if not self.path.is_file():
            return None
        if ignore:
            self.logger.info(f'recalibrate=True: ignoring {self.path}; starting from the '
                             'first unit')
            return None
        try:
            state = load_checkpoint_file(self.path, map_location='cpu')
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

    def finished(self) -> Path | None:
        """``work_dir/quantized.pth`` if it was made with this run's fingerprint, else None.

        A final checkpoint made with other settings (or before fingerprints were recorded)
        is left in place, logged, and overwritten when this calibration ends.
        """
        path = self.work_dir / FINAL_NAME
        if not path.is_file():
            return None
        try:
            saved = read_quantized(path)['meta'].get('fingerprint')
        except (ValueError, OSError, pickle.UnpicklingError) as err:
            self.logger.warning(f'not reusing {path}: {err}')
            return None
        diff = _differences(saved, self.fingerprint) if isinstance(saved, dict) else [
            'no recorded fingerprint']
        if diff:
            self.logger.info(f'not reusing {path}: made with other {", ".join(diff)}; '
                             'calibrating again (it is overwritten at the end)')
            return None
        self.logger.info(f'reusing the finished calibration {path}: same config, bits, '
                         'method, seed, calibration images and FP weights (recalibrate=True '
                         'calibrates again)')
        return path

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
        self.num_saved = num_finished
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
        path = atomic_save({'version': PARTIAL_VERSION, 'num_finished': int(num_finished),
                            'fingerprint': self.fingerprint, 'state_dict': floats,
                            'alpha_signs': signs}, self.path)
        self.num_saved = int(num_finished)
        return path

    def interrupted_message(self) -> str:
        """What a stopped calibration left behind (logged on SIGTERM)."""
        if self.num_saved:
            return (f'calibration stopped by SIGTERM; a resumable state is saved: {self.path} '
                    f'holds units 1..{self.num_saved}. Rerun the same command with the same '
                    f'work_dir to continue from unit {self.num_saved + 1}')
        return ('calibration stopped by SIGTERM before its first unit finished; nothing to '
                'resume (a rerun starts from the first unit)')

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
def sigterm_as_exception(resume: CalibrationResume | None = None,
                         logger: logging.Logger | None = None) -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`CalibrationInterrupted` in the main thread
    (so ``finally`` clean-up runs); the previous handler is restored afterwards. A no-op
    outside the main thread or when another handler is installed.

    Args:
        resume: the run's partial state; on SIGTERM ``logger`` says whether (and where) a
            resumable state was saved.
        logger: where that message goes.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise CalibrationInterrupted(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except CalibrationInterrupted:
        if logger is not None:
            logger.warning(resume.interrupted_message() if resume is not None else
                           'calibration stopped by SIGTERM; no resumable state is kept '
                           '(no work_dir, or resume=False)')
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
