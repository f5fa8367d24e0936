"""Helpers of the analysis tests. A missing bundled checkpoint FAILS the tests
(tools/train_bundled.sh makes them), it never skips them."""
from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUM_IMAGES = 8


def bundled(name: str) -> tuple[str, str]:
    """(config, checkpoint) of a bundled detector, e.g. ``'retinanet'``."""
    stem = f'{name}_r18-16_fpn64_synthetic'
    config = ROOT / 'configs' / 'synthetic' / f'{stem}.py'
    ckpt = ROOT / 'checkpoints' / f'{stem}.pth'
    if not ckpt.is_file():
        pytest.fail(f'bundled checkpoint {ckpt} is missing (bash tools/train_bundled.sh {stem})')
    return str(config), str(ckpt)


def run_cli(*argv: str) -> int:
    """``tools/analyze.py`` in this process."""
    spec = importlib.util.spec_from_file_location('analyze_cli', ROOT / 'tools' / 'analyze.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def assert_range(values, lo: float, hi: float, what: str = '') -> None:
    """Every value (numbers or CSV strings; empty = not measured) finite and in [lo, hi]."""
    values = [float(v) for v in values if v not in ('', None)]
    assert values, f'{what}: no values'
    for v in values:
        assert math.isfinite(v) and lo <= v <= hi, f'{what}: {v} not in [{lo}, {hi}]'


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000, path
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
