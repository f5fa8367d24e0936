"""Shared fixtures: the embedded benchmark data exists before any test reads it; one torch
thread where small convolutions share the cores; the command-line scripts as modules."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

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


@pytest.fixture(scope='session')
def single_thread():
    """One torch thread: small convs run several times faster on one thread while the 2
    shared cores are busy. Kept until the session ends (restored then)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def load_script() -> Callable[[str], ModuleType]:
    """``load_script('benchmarks/accuracy.py')``: a script of ``tools/`` or ``benchmarks/``
    imported by path (the scripts are command-line front ends, not a package)."""
    def load(relpath: str) -> ModuleType:
        path = ROOT / relpath
        name = f'_script_{path.parent.name}_{path.stem}'
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules[name]
    return load


def pytest_configure(config):
    os.environ.setdefault('OMP_NUM_THREADS', '2')
