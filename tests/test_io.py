"""Atomic writes: a failed or interrupted write leaves the previous file intact and no
temporary file behind."""
from __future__ import annotations

import pytest
import torch

from mmdet_regptq import io


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'quantized.pth'
    io.atomic_save({'v': torch.ones(3)}, path)

    def half_write(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt('killed mid-write')

    monkeypatch.setattr(torch, 'save', half_write)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_save({'v': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)['v'], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['quantized.pth']


def test_text_is_replaced_whole(tmp_path):
    path = tmp_path / 'sub' / 'ann.json'
    io.atomic_write_text('{"a": 1}', path)
    io.atomic_write_text('{"a": 2}', path)
    assert path.read_text() == '{"a": 2}'
    assert sorted(p.name for p in path.parent.iterdir()) == ['ann.json']
