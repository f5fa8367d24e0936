"""Fixtures of the analysis tests: the bundled detectors (checkpoints/*.pth) on a few val
images (helpers in ``analysis_utils.py``)."""
from __future__ import annotations

import pytest

from analysis_utils import NUM_IMAGES, bundled


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here runs on one torch thread (``single_thread``, tests/conftest.py)."""


def _detector(name: str):
    from mmdet_regptq.analysis import load_detector
    return load_detector(*bundled(name))


@pytest.fixture(scope='session')
def retinanet():
    return _detector('retinanet')


@pytest.fixture(scope='session')
def faster_rcnn():
    return _detector('faster-rcnn')


@pytest.fixture(scope='session')
def retina_bench(retinanet):
    from mmdet_regptq.analysis import DetectorBench
    cfg, model = retinanet
    return DetectorBench.from_val_set(cfg, model, num_images=NUM_IMAGES)


@pytest.fixture(scope='session')
def frcnn_bench(faster_rcnn):
    from mmdet_regptq.analysis import DetectorBench
    cfg, model = faster_rcnn
    return DetectorBench.from_val_set(cfg, model, num_images=NUM_IMAGES)
