"""Fixtures of the engine tests (helpers in ``engine_utils.py``)."""
from __future__ import annotations

import pytest

from engine_utils import calib_batches, small_cfg


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here runs on one torch thread (``single_thread``, tests/conftest.py)."""


@pytest.fixture(scope='session')
def tiny_cfg():
    return small_cfg()


@pytest.fixture(scope='session')
def tiny_batches(tiny_cfg):
    return calib_batches(tiny_cfg)
