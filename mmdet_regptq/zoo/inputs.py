"""The images a zoo model sees in the sweep: the bundled synthetic set through the config's
own test pipeline, its size capped for CPU time."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mmdet_regptq.bench.models import SYNTHETIC_ROOT as SYNTHETIC

__all__ = ['capped_test_pipeline', 'input_too_small', 'synthetic_images', 'synthetic_batch',
           'MAX_RETRY_SIZE']


_ANNOTATION_LOADERS = ('LoadAnnotations', 'LoadPanopticAnnotations', 'LoadTrackAnnotations',
                       'FilterAnnotations', 'LoadSemSegAnnotations')
_NEVER = ('LoadProposals',)   # precomputed proposal files: there are none for these images


def _cap_size(size: Any, factor: float) -> Any:
    if isinstance(size, int):
        return max(32, int(round(size * factor)))
    if isinstance(size, (tuple, list)) and all(isinstance(s, (int, float)) for s in size):
        return tuple(max(32, int(round(s * factor))) for s in size)
    return size


def capped_test_pipeline(cfg: Any, max_size: int = 320, max_fixed: int = 640, *,
                         annotations: bool = False) -> list[dict]:
    """The config's test pipeline, its size capped.

    ``annotations=False`` drops the annotation loading steps; ``True`` keeps box/mask
    loading (panoptic loading becomes box + mask loading: the synthetic set has no
    panoptic maps), as the calibration images get it through the train set.

    A keep-ratio ``Resize`` (and a fixed ``Pad`` size) is scaled so that its longer side is
    at most ``max_size``; a fixed-shape resize (``keep_ratio=False``, ``FixShapeResize``)
    keeps the config's size up to ``max_fixed`` because anchors/priors may assume it.
    """
    if cfg.get('test_dataloader') is not None:
        pipeline = copy.deepcopy(cfg.test_dataloader['dataset'].get('pipeline'))
    else:
        pipeline = copy.deepcopy(cfg.get('test_pipeline'))
    if not pipeline:
        raise ValueError('the config has no test pipeline')
    pipeline = [dict(t) for t in pipeline]
    factor = 1.0
    out = []
    for t in pipeline:
        kind = str(t.get('type', '')).split('.')[-1]
        if kind in _NEVER or (kind in _ANNOTATION_LOADERS and not annotations):
            continue
        if kind in ('LoadPanopticAnnotations', 'LoadSemSegAnnotations', 'LoadTrackAnnotations'):
            t = dict(type='LoadAnnotations', with_bbox=True, with_mask=True)
        elif kind == 'LoadAnnotations':
            t['with_seg'] = False
        if kind == 'LoadImageFromFile':
            t['backend_args'] = None
        if kind in ('Resize', 'RandomResize') and t.get('scale') is not None:
            scale = t['scale']
            longest = max(scale) if isinstance(scale, (tuple, list)) else scale
            fixed = not t.get('keep_ratio', False)
            limit = max_fixed if fixed else max_size
            factor = min(1.0, limit / longest)
            t['scale'] = _cap_size(scale, factor)
        if kind == 'FixShapeResize':
            factor = min(1.0, max_fixed / max(t['width'], t['height']))
            t['width'], t['height'] = _cap_size((t['width'], t['height']), factor)
        if kind == 'Pad' and t.get('size') is not None:
            t['size'] = _cap_size(t['size'], factor if factor < 1 else
                                  min(1.0, max_size / max(t['size'])))
        out.append(t)
    return out


#: largest ``max_size`` tried when an input is too small for the network (doubling)
MAX_RETRY_SIZE = 1280


#: errors of an input too small for the network: a feature map smaller than a kernel
#: (mmcv's deformable conv, torch's conv), or fewer encoder tokens than the queries a
#: two-stage DETR selects with ``topk`` (DINO: 900 queries, 765 tokens at 192x192)
_TOO_SMALL = ('smaller than kernel', "Kernel size can't be greater than actual",
              'selected index k out of range')


def input_too_small(err: BaseException) -> bool:
    """Whether ``err`` says the input is too small for the network (see ``_TOO_SMALL``)."""
    return any(text in str(err) for text in _TOO_SMALL)


def synthetic_images(num: int = 2, split: str = 'val') -> list[Path]:
    """The first ``num`` images of the bundled synthetic set."""
    images = sorted((SYNTHETIC / split).glob('*.jpg'))[:num]
    if len(images) < num:
        raise FileNotFoundError(f'{SYNTHETIC / split} has {len(images)} images, need {num}; '
                                'run python -m mmdet_regptq.datasets.synthetic')
    return images


def synthetic_batch(cfg: Any, num_images: int = 2, max_size: int = 320) -> dict:
    """One collated batch (``inputs`` + ``data_samples``) of synthetic images through the
    config's capped test pipeline, with their boxes and masks, as the calibration loader
    (train images through the test pipeline) would yield it."""
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    from mmdet.datasets import CocoDataset
    from mmdet.registry import TRANSFORMS
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    steps = capped_test_pipeline(cfg, max_size, annotations=True)
    pipeline = Compose([TRANSFORMS.build(t) for t in steps])
    keys = ' '.join(str(t.get('meta_keys', '')) for t in steps)
    classes = ('circle', 'rectangle', 'triangle', 'ellipse', 'star', 'cross')
    dataset = CocoDataset(data_root=str(SYNTHETIC), ann_file='annotations/instances_val.json',
                          data_prefix=dict(img=''), metainfo=dict(classes=classes),
                          pipeline=[], test_mode=True)
    if len(dataset) < num_images:
        raise FileNotFoundError(f'{SYNTHETIC} has {len(dataset)} val images, need '
                                f'{num_images}; run python -m mmdet_regptq.datasets.synthetic')
    data = []
    for i in range(num_images):
        item = dataset.get_data_info(i)
        if 'text' in keys:                     # grounding detectors: class names as prompt
            item.update(text=classes, custom_entities=True)
        data.append(pipeline(item))
    return pseudo_collate(data)
