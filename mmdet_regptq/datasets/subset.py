"""A COCO annotation file restricted to the first N images (for quick evaluations).

mmdet's CocoMetric scores every image of its ``ann_file``, so evaluating a subset of the
val images needs an annotation file that holds exactly that subset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_coco_subset(src: str | os.PathLike, num_images: int,
                      dst: str | os.PathLike | None = None) -> Path:
    """Write ``<src stem>_first<N>.json`` (or ``dst``) with the first ``num_images`` images
    by id and their annotations; idempotent (an existing file is kept)."""
    src = Path(src)
    dst = Path(dst) if dst else src.with_name(f'{src.stem}_first{num_images}.json')
    if dst.is_file():
        return dst
    data = json.loads(src.read_text())
    if not 1 <= num_images <= len(data['images']):
        raise ValueError(f'num_images={num_images} out of range; allowed 1..{len(data["images"])}')
    images = sorted(data['images'], key=lambda im: im['id'])[:num_images]
    keep = {im['id'] for im in images}
    subset = {**data, 'images': images,
              'annotations': [a for a in data['annotations'] if a['image_id'] in keep]}
    tmp = dst.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(subset, sort_keys=True, separators=(',', ':')))
    os.replace(tmp, dst)
    return dst
