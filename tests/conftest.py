"""Shared fixtures: the embedded benchmark data exists before any test reads it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / 'data' / 'synthetic'


@pytest.fixture(scope='session', autouse=True)
def synthetic_data() -> Path:
    """The default synthetic set (seed 0), generated once per machine (~20 s); autouse
    because many tests read data/synthetic through the configs."""
    from mmdet_regptq.datasets.synthetic import generate
    generate(DATA, seed=0)
    return DATA


@pytest.fixture(scope='session')
def val_subset(synthetic_data: Path) -> Path:
    """Annotation file of the first 100 val images (quick evaluations)."""
    from mmdet_regptq.datasets.subset import write_coco_subset
    return write_coco_subset(synthetic_data / 'annotations' / 'instances_val.json', 100)


def pytest_configure(config):
    os.environ.setdefault('OMP_NUM_THREADS', '2')
