"""Fixtures of the YOLOv5 tests: the real-data folder beside the checkout and a converted
YOLOv5n (written under pytest's temporary folder; the AGPL weights never enter the repo)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from yolov5_utils import REALDATA, YOLOV5N


@pytest.fixture(scope='session')
def realdata() -> Path:
    """The real-data folder; the test is skipped (with the path) where it is absent."""
    if not (YOLOV5N / 'yolov5n.pt').is_file():
        pytest.skip(f'real data not found: {YOLOV5N / "yolov5n.pt"} (set REGPTQ_REALDATA to '
                    'the folder holding yolov5n/, coco128_train2017/, coco128_val2017/)')
    return REALDATA


@pytest.fixture(scope='session')
def yolov5n_meta(realdata: Path) -> dict:
    return json.loads((realdata / 'yolov5n' / 'yolov5n_meta.json').read_text())


@pytest.fixture(scope='session')
def converted(realdata: Path, tmp_path_factory) -> Path:
    """yolov5n.pt converted by the converter under test."""
    from mmdet_regptq.yolov5.convert import convert_yolov5
    dst = tmp_path_factory.mktemp('yolov5') / 'yolov5n_mmdet.pth'
    convert_yolov5(realdata / 'yolov5n' / 'yolov5n.pt', dst)
    return dst
