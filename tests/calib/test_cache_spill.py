"""Spilling the activation cache: a full disk gives an error naming the directory, the
bytes and the two settings; spill directories of dead processes are removed."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdet_regptq.calib import cache as cache_mod
from mmdet_regptq.calib.cache import (OWNER_FILE, SPILL_PREFIX, ActivationCache,
                                      SpillSpaceError, remove_stale_spill_dirs)


def _entry_bytes() -> int:
    return 4 * 1000 * 2   # args + output of one add() below


def _add(cache: ActivationCache) -> None:
    cache.add((torch.zeros(1000),), output=torch.zeros(1000))


def test_enospc_names_directory_bytes_and_settings(tmp_path, monkeypatch):
    def full_disk(obj, path, *args, **kwargs):
        with open(path, 'wb') as f:
            f.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', full_disk)
    cache = ActivationCache(max_bytes=0, spill_dir=str(tmp_path))
    with pytest.raises(SpillSpaceError) as info:
        _add(cache)
    text = str(info.value)
    spill = Path(cache._tmpdir)
    assert spill.parent == tmp_path and spill.name.startswith(f'{SPILL_PREFIX}{os.getpid()}_')
    assert f'no space left in the spill directory {spill}' in text
    assert f'to write {_entry_bytes()} bytes' in text
    assert 'spill_dir' in text and 'cache_max_bytes (now 0)' in text
    assert info.value.errno == errno.ENOSPC
    assert not any(p.suffix == '.pt' for p in spill.iterdir())   # no half-written entry
    cache.clear()
    assert not spill.exists()


def test_torch_writer_error_on_a_full_disk_is_explained(tmp_path, monkeypatch):
    """torch's C++ writer fails without an errno (``basic_ios::clear``); the free space
    decides."""
    def cpp_error(obj, path, *args, **kwargs):
        raise RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos')

    monkeypatch.setattr(torch, 'save', cpp_error)
    monkeypatch.setattr(ActivationCache, '_free', lambda self: 10)
    cache = ActivationCache(max_bytes=0, spill_dir=str(tmp_path))
    with pytest.raises(SpillSpaceError, match=r'10 bytes free\); set the PTQ method'):
        _add(cache)
    monkeypatch.setattr(ActivationCache, '_free', lambda self: 1 << 40)
    with pytest.raises(RuntimeError, match='enforce fail'):   # not a space problem: as is
        _add(cache)


def test_spill_round_trip_and_cleanup(tmp_path):
    cache = ActivationCache(max_bytes=0, spill_dir=str(tmp_path))
    _add(cache)
    spill = Path(cache._tmpdir)
    owner = (spill / OWNER_FILE).read_text().split()
    assert int(owner[0]) == os.getpid()
    assert cache.num_spilled == 1 and torch.equal(cache[0].output, torch.zeros(1000))
    del cache
    assert not spill.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_stale_spill_dirs_of_dead_processes_are_removed(tmp_path):
    import socket
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        dirs = {}
        for name, owner in (('dead', f'{_dead_pid()} {host}'), ('live', f'{live.pid} {host}'),
                            ('other_host', f'{_dead_pid()} elsewhere')):
            d = tmp_path / f'{SPILL_PREFIX}{name}'
            d.mkdir()
            (d / OWNER_FILE).write_text(owner)
            (d / 'entry_000000.pt').write_bytes(b'x' * 10)
            dirs[name] = d
        no_marker = tmp_path / f'{SPILL_PREFIX}nomarker'        # not ours: never touched
        no_marker.mkdir()
        unrelated = tmp_path / 'someone_elses'
        unrelated.mkdir()
        cache_mod._cleaned_roots.discard(os.path.abspath(tmp_path))
        ActivationCache(max_bytes=0, spill_dir=str(tmp_path))   # a run starts
        assert not dirs['dead'].exists()
        assert dirs['live'].exists() and dirs['other_host'].exists()
        assert no_marker.exists() and unrelated.exists()
        assert remove_stale_spill_dirs(str(tmp_path)) == []
    finally:
        live.kill()
        live.wait()
