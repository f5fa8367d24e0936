"""Explicit initialisation of activation quantizers from calibration forwards."""
from __future__ import annotations

import logging
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from .convert import iter_quant_modules
from .quantizers import Quantizer
from .quantizers.functional import normalize_axis, to_channel_rows
from .utils import removing

__all__ = ['ActivationObserver', 'ParallelInit', 'init_activation_quantizers']

logger = logging.getLogger(__name__)


def _pick(num: int, keep: int, gen: torch.Generator) -> Tensor:
    """``keep`` deterministic column indices out of ``num`` (without replacement if cheap)."""
    if num <= 4 * keep:
        return torch.randperm(num, generator=gen)[:keep]
    return torch.randint(num, (keep,), generator=gen)


class ActivationObserver:
    """Bounded, deterministic sample of every tensor seen by one quantizer.

    Keeps at most ``max_elements`` values (a reservoir in which every call is represented
    in proportion to its size) plus the exact running min and max, so 'minmax' sees the
    true range and the searches see a representative sample.

    Args:
        per_channel: keep channels apart (for per-channel activation quantizers).
        ch_axis: channel axis of the observed tensors (when ``per_channel``).
        max_elements: size bound of the sample.
        seed: seed of the subsampling generator.
    """

    def __init__(self, *, per_channel: bool = False, ch_axis: int = 1,
                 max_elements: int = 1_000_000, seed: int = 0) -> None:
        if max_elements < 1:
            raise ValueError(f'max_elements={max_elements} must be >= 1')
        self.per_channel = per_channel
        self.ch_axis = ch_axis
        self.max_elements = max_elements
        self.num_calls = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._seed = seed
        self._ndim = 0
        self._axis: int | None = None
        self._rows: Tensor | None = None      # [C, M]
        self._seen = 0                         # columns seen so far
        self._lo: Tensor | None = None         # [C]
        self._hi: Tensor | None = None         # [C]

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add one observed tensor (any shape; per channel, the channel axis is kept)."""
        if x.numel() == 0:
            return
        x = x.detach().float()
        if self.num_calls == 0:
            self._ndim = x.dim()
            self._axis = normalize_axis(self.ch_axis, x.dim()) if self.per_channel else None
        rows = to_channel_rows(x, self._axis)                        # [C, N]
        if self._rows is not None and rows.shape[0] != self._rows.shape[0]:
            raise ValueError(f'observed {rows.shape[0]} channels after {self._rows.shape[0]}')
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        self._merge(rows)
        self.num_calls += 1

    def _merge(self, rows: Tensor) -> None:
        budget = max(1, self.max_elements // rows.shape[0])
        new = rows.shape[1]
        old = 0 if self._rows is None else self._rows.shape[1]
        total = self._seen + new
        self._seen = total
        if old + new <= budget:
            self._rows = rows if self._rows is None else torch.cat([self._rows, rows], dim=1)
            return
        keep_old = min(old, round(budget * (total - new) / total))
        keep_new = min(new, budget - keep_old)
        parts = [rows.index_select(1, _pick(new, keep_new, self._gen).to(rows.device))]
        if keep_old and self._rows is not None:
            idx = _pick(old, keep_old, self._gen).to(rows.device)
            parts.insert(0, self._rows.index_select(1, idx))
        self._rows = torch.cat(parts, dim=1)

    def state(self) -> dict[str, Any]:
        """What :meth:`merge` reads: the sample ``rows [C, M]``, the columns ``seen``, the
        exact ``lo`` / ``hi`` ``[C]``, ``num_calls`` and the observed layout."""
        return dict(rows=self._rows, seen=self._seen, lo=self._lo, hi=self._hi,
                    num_calls=self.num_calls, ndim=self._ndim, axis=self._axis)

    @torch.no_grad()
    def merge(self, states: Sequence[dict[str, Any]]) -> None:
        """Become the observer of the union of the inputs behind ``states`` (e.g. one per
        process of a data-parallel calibration, this one's included): the exact min / max
        over all, and a sample of at most ``max_elements`` in which each part keeps a share
        proportional to the columns it saw. Deterministic in ``states`` and the seed, so
        every process merging the same states ends with the same observer."""
        parts = [s for s in states if s['num_calls'] > 0 and s['rows'] is not None]
        self.num_calls = sum(s['num_calls'] for s in states)
        if not parts:
            return
        device = self._rows.device if self._rows is not None else parts[0]['rows'].device
        rows = [s['rows'].to(device) for s in parts]
        total = sum(s['seen'] for s in parts)
        budget = max(1, self.max_elements // rows[0].shape[0])
        if sum(r.shape[1] for r in rows) > budget:
            gen = torch.Generator().manual_seed(self._seed)
            rows = [r.index_select(1, _pick(r.shape[1], min(r.shape[1], round(
                budget * s['seen'] / total)), gen).to(device)) for r, s in zip(rows, parts)]
        self._rows = torch.cat(rows, dim=1)
        self._seen = total
        self._lo = torch.stack([s['lo'].to(device) for s in parts]).amin(dim=0)
        self._hi = torch.stack([s['hi'].to(device) for s in parts]).amax(dim=0)
        self._ndim, self._axis = parts[0]['ndim'], parts[0]['axis']

    def sample(self) -> Tensor:
        """The sample plus the exact min/max, shaped for ``Quantizer.init_from``.

        Returns:
            Per tensor: 1-d ``[M + 2]``. Per channel: ``ndim``-d with ``C`` at the channel
            axis and the samples on another axis (e.g. ``[M + 2, C, 1, 1]`` for NCHW).
        """
        if self._rows is None or self._lo is None or self._hi is None:
            raise RuntimeError('ActivationObserver.sample() before any update()')
        rows = torch.cat([self._rows, self._lo[:, None], self._hi[:, None]], dim=1)
        if self._axis is None:
            return rows.reshape(-1)
        if self._ndim < 2:
            raise ValueError('per-channel observation needs tensors with at least 2 dims')
        expanded = rows.reshape(*rows.shape, *([1] * (self._ndim - 2)))
        return expanded.movedim(0, self._axis)


class ParallelInit(Protocol):
    """How several processes share :func:`init_activation_quantizers` (data parallelism)."""

    def merge(self, observer: ActivationObserver) -> None:
        """Make ``observer`` the observer of every process's inputs (call on all of them,
        for the same observers in the same order)."""

    def run(self, jobs: Sequence[tuple[nn.Module, Callable[[], None]]]) -> None:
        """Run each ``(module, job)`` on one process, then give every process the state
        each job left in its module."""


def _input_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    found: dict[int, tuple[str, Quantizer]] = {}
    for module_name, module in iter_quant_modules(model):
        if not module.quant_input:
            continue
        for slot, attr in module.input_slots().items():
            q = getattr(module, attr)
            if q is not None and q.enabled and id(q) not in found:
                found[id(q)] = (q.name or f'{module_name}.{attr}', q)
    return list(found.values())


def init_activation_quantizers(model: nn.Module, run_forward: Callable[[], None],
                               max_elements: int = 1_000_000, seed: int = 0,
                               parallel: ParallelInit | None = None
                               ) -> list[str]:
    """Initialise every enabled input quantizer from the inputs seen by ``run_forward``.

    During ``run_forward()`` (called once, under ``no_grad``; it may run many batches) the
    observed quantizers are disabled (identity), so every layer sees float activations from
    the layers before it (with their weights quantized if weight quantization is on). Each
    quantizer's inputs are kept as a bounded deterministic sample (``ActivationObserver``)
    and passed to its ``init_from``. Put the model in eval mode before calling.

    Args:
        model: a model converted by ``quantize_model``.
        run_forward: runs the calibration forwards, e.g. ``lambda: [model(x) for x in xs]``.
        max_elements: size bound of each quantizer's sample.
        seed: seed of the subsampling.
        parallel: several processes share the initialisation (:class:`ParallelInit`,
            e.g. ``mmdet_regptq.calib.dist.ObserverSharing``): every observer is merged
            over them, then each quantizer is initialised by one process and its state
            copied to the others.

    Returns:
        Names of the initialised quantizers. Quantizers that saw no input stay
        un-initialised and are logged as a warning.
    """
    targets = _input_quantizers(model)
    observers: dict[int, ActivationObserver] = {}
    with removing([]) as handles:
        for _, q in targets:
            obs = ActivationObserver(per_channel=getattr(q, 'per_channel', False),
                                     ch_axis=getattr(q, 'ch_axis', 1),
                                     max_elements=max_elements, seed=seed)
            observers[id(q)] = obs
            handles.append(q.register_forward_pre_hook(
                lambda _m, args, o=obs: o.update(args[0])))
            q.enabled = False
        try:
            with torch.no_grad():
                run_forward()
        finally:
            for _, q in targets:
                q.enabled = True
    if parallel is not None:
        for _, q in targets:
            parallel.merge(observers[id(q)])
    initialized, missing = [], []
    jobs: list[tuple[nn.Module, Callable[[], None]]] = []
    for name, q in targets:
        obs = observers[id(q)]
        if obs.num_calls == 0:
            missing.append(name)
            continue
        jobs.append((q, lambda q=q, obs=obs: q.init_from(obs.sample())))
        initialized.append(name)
    if parallel is None:
        for _, job in jobs:
            job()
    else:
        parallel.run(jobs)
    if missing:
        logger.warning('%d input quantizers saw no data and stay un-initialised: %s',
                       len(missing), ', '.join(missing))
    return initialized
