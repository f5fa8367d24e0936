"""Calibration data from an mmdet config: a fixed, seeded subset of the TRAIN images
passed through the TEST pipeline (no augmentation), as the paper and QDrop do."""
from __future__ import annotations

import copy
from typing import Any

import torch
from mmengine.config import Config, ConfigDict
from mmengine.dataset import pseudo_collate
from mmengine.registry import DATASETS
from torch.utils.data import DataLoader, Subset


def _as_dict(cfg: Any) -> dict:
    return cfg.to_dict() if isinstance(cfg, (Config, ConfigDict)) else copy.deepcopy(dict(cfg))


def build_calib_dataset(cfg: Config, dataset: dict | None = None) -> Any:
    """The train dataset with its pipeline replaced by the test pipeline.

    Args:
        cfg: the full runner config (``train_dataloader`` and ``test_dataloader`` used).
        dataset: an explicit dataset config overriding the default.
    """
    if dataset is None:
        if cfg.get('train_dataloader') is None:
            raise ValueError('calib: the config has no train_dataloader; set '
                             'calib.dataloader=dict(dataset=...) to name calibration images')
        dataset = _as_dict(cfg.train_dataloader['dataset'])
        test_pipeline = _as_dict(cfg.test_dataloader['dataset'])['pipeline']
        inner = dataset
        while 'pipeline' not in inner and 'dataset' in inner:  # RepeatDataset & co.
            inner = inner['dataset']
        inner['pipeline'] = test_pipeline
    from mmdet.utils import register_all_modules  # noqa: F401  (scope for building)
    with DATASETS.switch_scope_and_registry(cfg.get('default_scope', 'mmdet')) as registry:
        return registry.build(dataset)


def build_calib_loader(cfg: Config, *, num_images: int = 256, batch_size: int = 2,
                       seed: int = 0, dataloader: dict | None = None,
                       num_workers: int = 0) -> DataLoader:
    """A deterministic loader over ``num_images`` images drawn with ``seed``.

    Raises:
        ValueError: when the dataset is empty or smaller than ``num_images``.
    """
    if num_images < 1:
        raise ValueError(f'calib.num_images={num_images} must be >= 1')
    if batch_size < 1:
        raise ValueError(f'calib.batch_size={batch_size} must be >= 1')
    dataset = build_calib_dataset(cfg, (dataloader or {}).get('dataset'))
    if len(dataset) == 0:
        raise ValueError('calib: the calibration dataset is empty')
    if num_images > len(dataset):
        raise ValueError(f'calib.num_images={num_images} is larger than the calibration '
                         f'dataset ({len(dataset)} images); allowed 1..{len(dataset)}')
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:num_images].tolist()
    return DataLoader(Subset(dataset, sorted(indices)), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=pseudo_collate)
