"""A COCO annotation file restricted to the first N images (for quick evaluations).

mmdet's CocoMetric scores every image of its ``ann_file``, so evaluating a subset of the
val images needs an annotation file that holds exactly that subset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..io import atomic_write_text


def write_coco_subset(src: str | os.PathLike, num_images: int,
                      dst: str | os.PathLike | None = None, offset: int = 0) -> Path:
    """Write ``<src stem>_first<N>.json`` (or ``dst``) with the first ``num_images`` images
    by id and their annotations; idempotent (an existing file is kept).

    ``offset > 0`` skips that many images first (``<stem>_from<offset>_first<N>.json``):
    a held-out slice for choosing settings, disjoint from the reported first ``N``.
    """
    src = Path(src)
    name = f'{src.stem}_first{num_images}.json' if not offset else \
        f'{src.stem}_from{offset}_first{num_images}.json'
    dst = Path(dst) if dst else src.with_name(name)
    if dst.is_file():
        return dst
    data = json.loads(src.read_text())
    if offset < 0 or offset >= len(data['images']):
        raise ValueError(f'offset={offset} out of range; allowed 0..{len(data["images"]) - 1}')
    if not 1 <= num_images <= len(data['images']) - offset:
        raise ValueError(f'num_images={num_images} out of range; allowed '
                         f'1..{len(data["images"]) - offset} (offset {offset})')
    images = sorted(data['images'], key=lambda im: im['id'])[offset:offset + num_images]
    keep = {im['id'] for im in images}
    subset = {**data, 'images': images,
              'annotations': [a for a in data['annotations'] if a['image_id'] in keep]}
    return atomic_write_text(json.dumps(subset, sort_keys=True, separators=(',', ':')), dst)
