"""Bounded activation cache: in memory up to a cap, then spilled to disk.

Spill files go to a private directory ``regptq_cache_<pid>_<random>`` under ``spill_dir``
(a PTQ method's ``spill_dir`` option; default: the system's temporary directory,
``tempfile.gettempdir()``, i.e. ``$TMPDIR`` or ``/tmp``). Each such directory holds an
owner marker (pid and host); directories whose owner process on this host is gone (a
killed run) are removed when the next cache in that ``spill_dir`` starts. A full disk
stops the run with :class:`SpillSpaceError` naming the directory, the bytes needed and
the two settings that change it (``spill_dir``, ``cache_max_bytes``).
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from ._tree import detach_to, tree_nbytes

GiB = 1 << 30
SPILL_PREFIX = 'regptq_cache_'
OWNER_FILE = '.regptq_owner'
_cleaned_roots: set[str] = set()


class SpillSpaceError(OSError):
    """No space left where the activation cache spills."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def remove_stale_spill_dirs(root: str | None = None) -> list[str]:
    """Remove spill directories under ``root`` (default: the system temp dir) that this
    package created (name prefix and owner marker) for a process on this host that is gone.

    Returns:
        The removed directories.
    """
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(root) if n.startswith(SPILL_PREFIX)]
    except OSError:
        return removed
    host = socket.gethostname()
    for name in names:
        path = os.path.join(root, name)
        try:
            with open(os.path.join(path, OWNER_FILE), encoding='utf-8') as f:
                pid_text, _, owner_host = f.read().strip().partition(' ')
            pid = int(pid_text)
        except (OSError, ValueError):
            continue   # not ours (or not readable): leave it
        if owner_host == host and pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _clean_once(root: str | None) -> None:
    """:func:`remove_stale_spill_dirs` once per directory and process."""
    key = os.path.abspath(root or tempfile.gettempdir())
    if key not in _cleaned_roots:
        _cleaned_roots.add(key)
        remove_stale_spill_dirs(key)


def _make_spill_dir(root: str | None) -> str:
    if root is not None:
        os.makedirs(root, exist_ok=True)
    _clean_once(root)
    path = tempfile.mkdtemp(prefix=f'{SPILL_PREFIX}{os.getpid()}_', dir=root)
    with open(os.path.join(path, OWNER_FILE), 'w', encoding='utf-8') as f:
        f.write(f'{os.getpid()} {socket.gethostname()}\n')
    return path


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
    is garbage collected; those of a killed process by the next run (module docstring).
    Spill files are read back with ``weights_only=False`` (entries hold arbitrary leaves):
    they are this process's own files in a private ``0700`` directory.

    Args:
        max_bytes: cap on the bytes of tensors held in memory (default 2 GiB).
        spill_dir: parent directory of the spill files (each cache writes into its own
            private sub-directory, created on the first spill); ``None`` = the system's
            temporary directory (``tempfile.gettempdir()``).
        device: where in-memory tensors are kept.
    """

    def __init__(self, *, max_bytes: int = 2 * GiB, spill_dir: str | None = None,
                 device: torch.device | str = 'cpu') -> None:
        if max_bytes < 0:
            raise ValueError(f'ActivationCache: max_bytes must be >= 0, got {max_bytes}')
        self.max_bytes = int(max_bytes)
        self.device = torch.device(device)
        self._spill_root = spill_dir
        _clean_once(spill_dir)
        self._tmpdir: str | None = None
        self._finalizer: weakref.finalize | None = None
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
        try:
            torch.save(dict(args=entry.args, kwargs=entry.kwargs, output=entry.output,
                            extras=entry.extras), path)
        except (OSError, RuntimeError) as err:
            if os.path.exists(path):
                os.remove(path)
            if not self._out_of_space(err, size):
                raise
            raise SpillSpaceError(
                errno.ENOSPC,
                f'no space left in the spill directory {os.path.dirname(path)} to write '
                f'{size} bytes ({size / GiB:.2f} GiB) of cached activations ('
                f'{self.bytes_on_disk} bytes already spilled there, {self._free()} bytes '
                f'free); set the PTQ method\'s spill_dir to a disk with more room, or raise '
                f'its cache_max_bytes (now {self.max_bytes}) to keep more in memory') from err
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
        if self._finalizer is not None:
            self._finalizer()   # removes the private spill directory
            self._finalizer = self._tmpdir = None

    @property
    def num_spilled(self) -> int:
        return sum(isinstance(item, str) for item in self._items)

    def _spill_dir(self) -> str:
        # a private sub-directory: several caches may share one spill_dir
        if self._tmpdir is None:
            self._tmpdir = _make_spill_dir(self._spill_root)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir,
                                               ignore_errors=True)
        return self._tmpdir

    def _free(self) -> int | str:
        try:
            return shutil.disk_usage(self._tmpdir or self._spill_root
                                     or tempfile.gettempdir()).free
        except OSError:
            return 'unknown'

    def _out_of_space(self, err: BaseException, size: int) -> bool:
        """ENOSPC, or torch's C++ writer failing (no errno) on a disk without room."""
        if getattr(err, 'errno', None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        free = self._free()
        return isinstance(err, RuntimeError) and isinstance(free, int) and free < size

    def __del__(self) -> None:
        try:
            self.clear()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    def __repr__(self) -> str:
        return (f'ActivationCache(entries={len(self)}, in_memory={self.bytes_in_memory} B, '
                f'on_disk={self.bytes_on_disk} B, spilled={self.num_spilled})')
