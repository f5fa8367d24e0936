"""Helpers of the YOLOv5 tests: where the real data is, the coco128 config."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: ../shared/realdata beside the checkout, or $REGPTQ_REALDATA
REALDATA = Path(os.environ.get('REGPTQ_REALDATA', ROOT.parent / 'shared' / 'realdata'))
YOLOV5N = REALDATA / 'yolov5n'


def coco128_config():
    """configs/yolov5/yolov5_n_coco128.py pointed at REALDATA, loaders single-process."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(ROOT / 'configs' / 'yolov5' / 'yolov5_n_coco128.py'))
    for loader in ('train_dataloader', 'test_dataloader', 'val_dataloader'):
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    return cfg


def build_model(cfg):
    """The config's detector under mmdet's default scope, in eval mode."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    return MODELS.build(cfg.model).eval()
