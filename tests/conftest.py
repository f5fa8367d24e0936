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


#: what the torch-free runtime must not need: importing any of these fails in
#: ``run_without_torch``
NO_TORCH_BLOCKED = ('torch', 'torchvision', 'mmcv', 'mmdet', 'mmengine', 'mmdeploy', 'onnx')


@pytest.fixture
def run_without_torch(tmp_path: Path) -> Callable:
    """``run_without_torch(work_dir, images)``: ``python -m mmdet_regptq.deploy.run`` in a
    subprocess where importing torch, mmdet, ... (``NO_TORCH_BLOCKED``) fails; returns its
    ``--out`` JSON (image path -> detections)."""
    import json
    import subprocess

    def run(work_dir: Path, images: list[Path]) -> dict:
        blocker = tmp_path / 'blocker'
        blocker.mkdir(exist_ok=True)
        (blocker / 'sitecustomize.py').write_text(
            'import sys\n'
            f'BLOCKED = {NO_TORCH_BLOCKED!r}\n'
            'class _Block:\n'
            '    def find_spec(self, name, path=None, target=None):\n'
            "        if name.split('.')[0] in BLOCKED:\n"
            "            raise ImportError(f'{name} is blocked in this test')\n"
            'sys.meta_path.insert(0, _Block())\n')
        out = tmp_path / 'dets.json'
        env = dict(os.environ, PYTHONPATH=f'{blocker}{os.pathsep}{ROOT}', OMP_NUM_THREADS='1')
        proc = subprocess.run([sys.executable, '-m', 'mmdet_regptq.deploy.run', str(work_dir),
                               *map(str, images), '--out', str(out), '--threads', '1'],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        probe = subprocess.run([sys.executable, '-c', 'import torch'], env=env,
                               capture_output=True, text=True)
        assert probe.returncode != 0 and 'blocked' in probe.stderr   # the blocker works
        return json.loads(out.read_text())
    return run
