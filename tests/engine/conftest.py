"""Fixtures of the engine tests (helpers in ``engine_utils.py``)."""
from __future__ import annotations

import pytest
import torch

from engine_utils import calib_batches, small_cfg


@pytest.fixture(autouse=True, scope='module')
def single_thread():
    """Small convs run much faster on one thread while the 2 shared cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def tiny_cfg():
    return small_cfg()


@pytest.fixture(scope='session')
def tiny_batches(tiny_cfg):
    return calib_batches(tiny_cfg)
