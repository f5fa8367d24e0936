"""Bounded activation cache: in memory up to a cap, then spilled to disk."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from ._tree import detach_to, tree_nbytes

GiB = 1 << 30


@dataclass
class CacheEntry:
    """What one call of a unit saw.

    Attributes:
        args: positional inputs (quantized-model values).
        kwargs: keyword inputs.
        output: the target output (full-precision model).
        extras: optional values by name, e.g. ``'fp_args'`` (full-precision inputs for
            QDrop's mixing), ``'grad'`` (dL/dO for Fisher weighting), ``'batch'`` (index
            of the calibration batch the call came from).
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: Any = None
    extras: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return tree_nbytes((self.args, self.kwargs, self.output, self.extras))


class ActivationCache:
    """A list of :class:`CacheEntry`, tensors detached and stored on ``device`` (CPU).

    Entries are kept in memory until ``max_bytes`` would be exceeded; later entries are
    written with ``torch.save`` to ``spill_dir`` (a temporary directory when ``None``)
    and read back on access. Spill files are removed by :meth:`clear` and when the cache
    is garbage collected.

    Args:
        max_bytes: cap on the bytes of tensors held in memory (default 2 GiB).
        spill_dir: parent directory of the spill files (each cache writes into its own
            temporary sub-directory, created on the first spill); ``None`` = the system's
            temporary directory.
        device: where in-memory tensors are kept.
    """

    def __init__(self, *, max_bytes: int = 2 * GiB, spill_dir: str | None = None,
                 device: torch.device | str = 'cpu') -> None:
        if max_bytes < 0:
            raise ValueError(f'ActivationCache: max_bytes must be >= 0, got {max_bytes}')
        self.max_bytes = int(max_bytes)
        self.device = torch.device(device)
        self._spill_root = spill_dir
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._items: list[CacheEntry | str] = []
        self._keys: dict[Hashable, int] = {}
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> CacheEntry:
        item = self._items[index]
        if isinstance(item, CacheEntry):
            return item
        # our own file written by append(); entries hold arbitrary picklable leaves
        return CacheEntry(**torch.load(item, map_location=self.device, weights_only=False))

    def append(self, entry: CacheEntry, *, key: Hashable | None = None,
               copy: bool = True) -> None:
        """Store ``entry``.

        Args:
            entry: the entry.
            key: optional key for :meth:`index` (e.g. ``(batch, call)``), kept in memory.
            copy: store detached copies on the cache device (pass False only for tensors
                that are already private detached copies on that device).
        """
        if key is not None:
            if key in self._keys:
                raise KeyError(f'ActivationCache: duplicate key {key!r}')
            self._keys[key] = len(self._items)
        if copy:
            entry = CacheEntry(*detach_to((entry.args, entry.kwargs, entry.output,
                                           dict(entry.extras)), self.device))
        size = entry.nbytes()
        if self.bytes_in_memory + size <= self.max_bytes:
            self._items.append(entry)
            self.bytes_in_memory += size
            return
        path = os.path.join(self._spill_dir(), f'entry_{len(self._items):06d}.pt')
        torch.save(dict(args=entry.args, kwargs=entry.kwargs, output=entry.output,
                        extras=entry.extras), path)
        self._items.append(path)
        self.bytes_on_disk += size

    def add(self, args: tuple = (), kwargs: dict | None = None, output: Any = None, *,
            key: Hashable | None = None, **extras: Any) -> None:
        """Shorthand for ``append(CacheEntry(args, kwargs, output, extras), key=key)``."""
        self.append(CacheEntry(tuple(args), dict(kwargs or {}), output, extras), key=key)

    def keys(self) -> dict[Hashable, int]:
        """Key → position of every entry appended with a key."""
        return dict(self._keys)

    def index(self, key: Hashable) -> int:
        """Position of the entry appended with ``key``."""
        try:
            return self._keys[key]
        except KeyError:
            raise KeyError(f'ActivationCache: no entry with key {key!r}') from None

    def clear(self) -> None:
        """Drop all entries and delete the spill files."""
        for item in self._items:
            if isinstance(item, str) and os.path.exists(item):
                os.remove(item)
        self._items.clear()
        self._keys.clear()
        self.bytes_in_memory = self.bytes_on_disk = 0
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    @property
    def num_spilled(self) -> int:
        return sum(isinstance(item, str) for item in self._items)

    def _spill_dir(self) -> str:
        # a private sub-directory: several caches may share one spill_dir
        if self._tmpdir is None:
            if self._spill_root is not None:
                os.makedirs(self._spill_root, exist_ok=True)
            self._tmpdir = tempfile.TemporaryDirectory(prefix='regptq_cache_',
                                                       dir=self._spill_root)
        return self._tmpdir.name

    def __del__(self) -> None:
        try:
            self.clear()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    def __repr__(self) -> str:
        return (f'ActivationCache(entries={len(self)}, in_memory={self.bytes_in_memory} B, '
                f'on_disk={self.bytes_on_disk} B, spilled={self.num_spilled})')
