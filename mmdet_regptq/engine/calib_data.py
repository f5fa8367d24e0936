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

from mmdet_regptq.calib.dist import shard_indices


def _as_dict(cfg: Any) -> dict:
    return cfg.to_dict() if isinstance(cfg, (Config, ConfigDict)) else copy.deepcopy(dict(cfg))


def build_calib_dataset(cfg: Config, dataset: dict | None = None) -> Any:
    """The train dataset with its pipeline replaced by the test pipeline.

    Args:
        cfg: the full runner config (``train_dataloader`` and ``test_dataloader`` used).
        dataset: an explicit dataset config overriding the default; a dataset (or a
            wrapped one) without ``pipeline`` gets the test pipeline.
    """
    if dataset is None:
        if cfg.get('train_dataloader') is None:
            raise ValueError('calib: the config has no train_dataloader; set '
                             'calib.dataloader=dict(dataset=...) to name calibration images')
        dataset = _with_pipeline(_as_dict(cfg.train_dataloader['dataset']),
                                 _test_pipeline(cfg, 'train_dataloader.dataset'))
        field = 'train_dataloader.dataset'
    else:
        field = 'calib.dataloader.dataset'
        dataset = _as_dict(dataset)
        if _lacks_pipeline(dataset):
            dataset = _with_pipeline(dataset, _test_pipeline(cfg, field), keep=True)
    from mmdet.utils import register_all_modules  # noqa: F401  (scope for building)
    with DATASETS.switch_scope_and_registry(cfg.get('default_scope', 'mmdet')) as registry:
        try:
            return registry.build(dataset)
        except FileNotFoundError as err:
            raise FileNotFoundError(f'calib: the calibration images ({field}) cannot be '
                                    f'loaded: {err}') from err
        except ValueError as err:   # mmengine serialises the data list with np.concatenate
            if 'need at least one array' in str(err):
                raise ValueError(f'calib: the calibration dataset is empty ({field} has no '
                                 'images); allowed: a dataset with >= 1 image') from err
            raise


def _test_pipeline(cfg: Config, field: str) -> list:
    loader = cfg.get('test_dataloader')
    pipeline = _as_dict(loader['dataset']).get('pipeline') if loader else None
    if not pipeline:
        raise ValueError(f'calib: {field} needs a pipeline and the config has no '
                         'test_dataloader.dataset.pipeline to take it from; set '
                         'calib.dataloader=dict(dataset=dict(..., pipeline=[...]))')
    return pipeline


def _lacks_pipeline(node: dict) -> bool:
    """True if some leaf dataset of ``node`` has no ``pipeline``."""
    if 'datasets' in node:
        return any(_lacks_pipeline(d) for d in node['datasets'])
    if 'dataset' in node and 'pipeline' not in node:
        return _lacks_pipeline(node['dataset'])
    return not node.get('pipeline')


def _with_pipeline(node: dict, pipeline: list, keep: bool = False) -> dict:
    """Give every leaf dataset ``pipeline``: wrappers hold one dataset in ``dataset``
    (RepeatDataset, ClassBalancedDataset) or several in ``datasets`` (ConcatDataset, as
    the VOC07+12 configs); a mosaic/mix-up wrapper is dropped (its inner images are used).
    With ``keep``, leaves that have a pipeline keep it (an explicit calibration dataset)."""
    if str(node.get('type', '')).split('.')[-1] == 'MultiImageMixDataset':
        return _with_pipeline(node['dataset'], pipeline, keep)
    if 'datasets' in node:
        node['datasets'] = [_with_pipeline(d, pipeline, keep) for d in node['datasets']]
    elif 'dataset' in node and 'pipeline' not in node:
        node['dataset'] = _with_pipeline(node['dataset'], pipeline, keep)
    elif not (keep and node.get('pipeline')):
        node['pipeline'] = copy.deepcopy(pipeline)
    return node


def build_calib_loader(cfg: Config, *, num_images: int = 256, batch_size: int = 2,
                       seed: int = 0, dataloader: dict | None = None,
                       num_workers: int = 0) -> DataLoader:
    """A deterministic loader over ``num_images`` images drawn with ``seed``.

    Under a distributed launcher each rank loads its own part of these images, the same
    images in total (:func:`~mmdet_regptq.calib.dist.shard_indices`).

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
    # data-parallel calibration: this rank's part of the images (all of them in one process)
    indices, batch_size = shard_indices(sorted(indices), batch_size)
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=pseudo_collate)
