"""Seeded generator of a small COCO-format "shapes" detection dataset.

Why this exists
---------------
``mmdet_regptq`` has to be calibrated, quantized and evaluated end to end in
environments that have no network access and no COCO download.  This module
is the *embedded benchmark*: it writes a deterministic, COCO-format object
detection dataset that the real MMDetection code paths consume unchanged
(``CocoDataset`` for loading, ``CocoMetric``/pycocotools ``COCOeval`` for
bbox and segm mAP), so that FP32-vs-quantized accuracy can be compared without
any external data.

It is deliberately *not* trivial: objects span an order of magnitude in
scale, have varied aspect ratios, rotations and colours, may occlude each
other, and sit on textured backgrounds with class-free clutter, so that
detectors trained on it produce activation/weight statistics (and
quantization sensitivities) in the same spirit as on natural images.

Layout written under ``out_dir``::

    out_dir/
        meta.json                         # parameters, generator version, stats
        annotations/instances_train.json  # COCO instances (bbox + polygon segm)
        annotations/instances_val.json
        train/000000.jpg ...              # JPEG, quality 95, 4:4:4
        val/000000.jpg ...

``file_name`` in the JSON already carries the split folder (``train/...``), so
an MMDetection config uses ``data_root=out_dir``,
``ann_file='annotations/instances_train.json'``, ``data_prefix=dict(img='')``
and ``metainfo=METAINFO`` (see :data:`METAINFO`).

Generation rules
----------------
* Classes (category ids ``1..6`` in this order): circle, rectangle, triangle,
  ellipse, star, cross.  Circles are always round; ellipses always have an
  axis ratio of at least 1.5 so the two classes stay separable.
* 1-8 objects are attempted per image, classes drawn uniformly.
* Size: the long side of the axis-aligned bounding box is drawn log-uniformly
  in ``[10, 120 * size / 192]`` px; the short side is then forced to be at
  least 10 px.  Every box is therefore in ``[10, 0.625 * size]`` px per side
  and lies completely inside the image.
* Aspect ratios up to 3:1 (either orientation) for rectangles, ellipses and
  crosses; random rotation for every class except the circle (rectangles,
  ellipses and crosses are axis-aligned in part of the samples).
* Occlusion rule: objects are painted in order and later objects may cover
  earlier ones, but a placement is rejected (and re-drawn, up to 30 tries,
  after which the new object is skipped) if it would leave any earlier object
  with less than 50 % of its pixels visible.  Hence *every* painted object is
  annotated, every annotated object is at least 50 % visible, and no unlabelled
  partially visible shape exists.  Boxes and polygons are *amodal* (the full
  shape, including covered parts); ``area`` is the polygon area.
* Colours are random but must contrast with what is underneath (10th
  percentile of the per-pixel RGB distance >= 80 and of the luminance
  difference >= 35; the best of 24 candidates is used if none passes).
* Backgrounds: two-colour linear gradient + smooth low-frequency colour blobs
  + mid-frequency texture, thin random lines, random-walk curves and small
  dots (diameter <= 5 px, i.e. smaller than any object) before the objects, a
  few more thin lines/dots after them, optional slight blur, Gaussian noise
  with sigma in [1.5, 6].

Determinism
-----------
Each image has its own random streams derived from
``numpy.random.SeedSequence([seed, split_code, index])`` (split_code 0 for
train, 1 for val), split into an independent *geometry* stream (classes,
shapes, sizes, positions → annotations) and *appearance* stream (background,
clutter, colours, noise → pixels).  Image ``i`` therefore does not depend on
how many images are generated, and the annotations do not depend on floating
point details of the pixel pipeline.  JSON files are written with
``sort_keys=True`` and fixed separators, so the same seed and parameters give
byte-identical annotation files (and, with the same numpy/OpenCV/Pillow
builds, byte-identical JPEGs).

Usage::

    python -m mmdet_regptq.datasets.synthetic --out data/synthetic --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

__all__ = [
    'CLASSES',
    'PALETTE',
    'METAINFO',
    'GENERATOR_VERSION',
    'generate',
    'render_sample',
    'main',
]

#: Bump whenever the output for a given seed/parameters changes; a dataset
#: whose ``meta.json`` records another version is regenerated.
GENERATOR_VERSION = 1

#: Class names; category id of ``CLASSES[i]`` is ``i + 1``.
CLASSES: tuple[str, ...] = ('circle', 'rectangle', 'triangle', 'ellipse',
                            'star', 'cross')

#: One RGB colour per class (only used for visualisation by MMDetection).
PALETTE: list[tuple[int, int, int]] = [(220, 20, 60), (0, 130, 200),
                                       (60, 180, 75), (245, 130, 48),
                                       (145, 30, 180), (70, 240, 240)]

#: Ready-made ``metainfo`` for MMDetection's ``CocoDataset``.
METAINFO: dict[str, Any] = {'classes': CLASSES, 'palette': PALETTE}

SPLITS: tuple[str, ...] = ('train', 'val')
_SPLIT_CODES = {'train': 0, 'val': 1}

MIN_BOX_SIDE = 10.0          # px, absolute
MAX_BOX_FRAC = 120.0 / 192.0  # max box side as a fraction of the image side
MAX_OBJECTS = 8
MIN_VISIBLE_FRAC = 0.5       # occlusion rule, see module docstring
MAX_PLACEMENT_TRIES = 30
JPEG_QUALITY = 95

_SUPERSAMPLE = 4     # anti-aliasing factor for shape rasterisation
_SHIFT = 4           # sub-pixel bits for OpenCV drawing
_BORDER = 0.25       # px kept free between a box and the image border
_COLOUR_TRIES = 24
_MIN_RGB_DIST = 80.0
_MIN_LUMA_DIST = 35.0
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------
def _rotate(pts: np.ndarray, theta: float) -> np.ndarray:
    """Rotates ``(N, 2)`` points about the origin by ``theta`` radians."""
    c, s = math.cos(theta), math.sin(theta)
    return pts @ np.array([[c, s], [-s, c]])


def _axis_or_free_angle(rng: np.random.Generator, p_axis: float,
                        period: float) -> float:
    """Returns 0 / 90 degrees with probability ``p_axis``, else uniform."""
    if rng.random() < p_axis:
        return float(rng.integers(2)) * math.pi / 2
    return float(rng.uniform(0.0, period))


def _unit_shape(cls: str, rng: np.random.Generator) -> np.ndarray:
    """Samples an un-scaled, rotated polygon of class ``cls``.

    Args:
        cls: One of :data:`CLASSES`.
        rng: Geometry random stream.

    Returns:
        ``(N, 2)`` float64 vertices, roughly centred on the origin with a
        radius of about 1.
    """
    if cls == 'circle':
        t = np.linspace(0.0, 2 * math.pi, 40, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if cls == 'ellipse':
        ar = math.exp(rng.uniform(math.log(1.5), math.log(3.0)))
        t = np.linspace(0.0, 2 * math.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t) / ar], axis=1)
        return _rotate(pts, _axis_or_free_angle(rng, 0.3, math.pi))
    if cls == 'rectangle':
        ar = math.exp(rng.uniform(0.0, math.log(3.0)))
        h = 1.0 / ar
        pts = np.array([[-1.0, -h], [1.0, -h], [1.0, h], [-1.0, h]])
        return _rotate(pts, _axis_or_free_angle(rng, 0.5, math.pi))
    if cls == 'triangle':
        ang = (math.pi / 2 + np.arange(3) * 2 * math.pi / 3 +
               rng.uniform(-0.2, 0.2, 3))
        rad = rng.uniform(0.85, 1.15, 3)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        pts[:, 1] *= rng.uniform(0.75, 1.35)
        return _rotate(pts, float(rng.uniform(0.0, 2 * math.pi)))
    if cls == 'star':
        r_in = rng.uniform(0.38, 0.5)
        ang = math.pi / 2 + np.arange(10) * math.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, r_in)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        return _rotate(pts, float(rng.uniform(0.0, 2 * math.pi)))
    if cls == 'cross':
        ar = math.exp(rng.uniform(0.0, math.log(3.0)))
        lx, ly, h = 1.0, 1.0 / ar, rng.uniform(0.1, 0.18)
        pts = np.array([[h, ly], [h, h], [lx, h], [lx, -h], [h, -h],
                        [h, -ly], [-h, -ly], [-h, -h], [-lx, -h], [-lx, h],
                        [-h, h], [-h, ly]])
        return _rotate(pts, _axis_or_free_angle(rng, 0.5, math.pi / 2))
    raise ValueError(f'unknown class {cls!r}')


def _sample_shape(cls: str, rng: np.random.Generator,
                  size: int) -> np.ndarray:
    """Samples a scaled polygon whose bounding box starts at ``(0, 0)``.

    Args:
        cls: Class name.
        rng: Geometry random stream.
        size: Image side in px.

    Returns:
        ``(N, 2)`` vertices with ``min == (0, 0)`` and both box sides in
        ``[MIN_BOX_SIDE, MAX_BOX_FRAC * size]``.
    """
    lo, hi = MIN_BOX_SIDE, MAX_BOX_FRAC * size
    pts = _unit_shape(cls, rng)
    pts = pts - pts.min(axis=0)
    w, h = pts.max(axis=0)
    long_side = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    scale = long_side / max(w, h)
    if scale * min(w, h) < lo:
        scale = lo / min(w, h)
    # Guard against float round-off at the lower bound.
    return pts * (scale * (1.0 + 1e-9))


def _polygon_area(pts: np.ndarray) -> float:
    """Shoelace area of a simple polygon."""
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) -
                           np.dot(y, np.roll(x, -1))))


def _to_cv(pts: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Converts continuous COCO coordinates to OpenCV fixed-point points.

    COCO pixel ``i`` covers ``[i, i + 1)``; OpenCV draws with pixel centres at
    integer coordinates, hence the half-pixel shift.
    """
    return np.round((pts * scale - 0.5) * (1 << _SHIFT)).astype(np.int32)


def _rasterise(pts: np.ndarray, size: int
               ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Anti-aliased coverage of a polygon, cropped to its bounding box.

    Args:
        pts: ``(N, 2)`` vertices in image coordinates.
        size: Image side.

    Returns:
        ``(alpha, (x0, y0, x1, y1))``: float32 coverage in ``[0, 1]`` of the
        pixel crop ``[y0:y1, x0:x1]``.
    """
    x0, y0 = (max(0, int(math.floor(v))) for v in pts.min(axis=0))
    x1, y1 = (min(size, int(math.ceil(v))) for v in pts.max(axis=0))
    ss = _SUPERSAMPLE
    hires = np.zeros(((y1 - y0) * ss, (x1 - x0) * ss), dtype=np.uint8)
    local = _to_cv(pts - np.array([x0, y0], dtype=np.float64), ss)
    cv2.fillPoly(hires, [local], 255, cv2.LINE_8, _SHIFT)
    alpha = cv2.resize(hires, (x1 - x0, y1 - y0),
                       interpolation=cv2.INTER_AREA)
    return alpha.astype(np.float32) * (1.0 / 255.0), (x0, y0, x1, y1)


# --------------------------------------------------------------------------
# appearance
# --------------------------------------------------------------------------
def _smooth_field(rng: np.random.Generator, size: int, cells: int,
                  amp: float) -> np.ndarray:
    """Smooth random RGB field: a ``cells x cells`` grid upsampled bicubically."""
    grid = rng.normal(0.0, amp, (cells, cells, 3)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + blobs + texture background, float32 ``(size, size, 3)``."""
    c1 = rng.uniform(0.0, 255.0, 3)
    c2 = np.clip(c1 + rng.normal(0.0, 60.0, 3), 0.0, 255.0)
    ang = rng.uniform(0.0, 2 * math.pi)
    coords = np.arange(size, dtype=np.float32) + 0.5
    proj = (coords[None, :] * math.cos(ang) + coords[:, None] * math.sin(ang))
    proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    img = (c1.astype(np.float32)[None, None, :] +
           (c2 - c1).astype(np.float32)[None, None, :] * proj[..., None])
    img += _smooth_field(rng, size, int(rng.integers(2, 6)),
                         rng.uniform(5.0, 35.0))
    img += _smooth_field(rng, size, int(rng.integers(8, 25)),
                         rng.uniform(0.0, 12.0))
    return img


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """Uniform random RGB colour."""
    c = rng.uniform(0.0, 255.0, 3)
    return float(c[0]), float(c[1]), float(c[2])


def _draw_clutter(img: np.ndarray, rng: np.random.Generator, n_lines: int,
                  n_curves: int, n_dots: int, max_thickness: int) -> None:
    """Draws class-free clutter (lines, curves, small dots) in place."""
    size = img.shape[0]
    for _ in range(n_lines):
        p = rng.uniform(-0.2 * size, 1.2 * size, 4)
        thick = 1 if rng.random() < 0.8 else max_thickness
        cv2.line(img, tuple(_to_cv(p[:2]).tolist()),
                 tuple(_to_cv(p[2:]).tolist()), _random_colour(rng), thick,
                 cv2.LINE_AA, _SHIFT)
    for _ in range(n_curves):
        n = int(rng.integers(5, 12))
        heading = rng.uniform(0.0, 2 * math.pi) + np.cumsum(
            rng.normal(0.0, 0.5, n))
        step = rng.uniform(4.0, 14.0, n)
        pts = rng.uniform(0.0, size, 2) + np.cumsum(
            np.stack([step * np.cos(heading), step * np.sin(heading)], 1), 0)
        cv2.polylines(img, [_to_cv(pts)], False, _random_colour(rng), 1,
                      cv2.LINE_AA, _SHIFT)
    for _ in range(n_dots):
        c = rng.uniform(0.0, size, 2)
        radius = rng.uniform(0.7, 2.5)
        cv2.circle(img, tuple(_to_cv(c).tolist()),
                   int(round(radius * (1 << _SHIFT))), _random_colour(rng),
                   -1, cv2.LINE_AA, _SHIFT)


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """Picks a random colour that contrasts with the pixels it will cover.

    Args:
        rng: Appearance random stream.
        under: ``(N, 3)`` float32 pixels currently under the object.

    Returns:
        float32 RGB colour.
    """
    k = max(0, int(0.1 * (len(under) - 1)))
    luma_under = under @ _LUMA
    best, best_score = None, -1.0
    for _ in range(_COLOUR_TRIES):
        c = rng.uniform(0.0, 255.0, 3).astype(np.float32)
        d_rgb = np.sqrt(((under - c) ** 2).sum(axis=1))
        d_luma = np.abs(luma_under - float(c @ _LUMA))
        score = min(float(np.partition(d_rgb, k)[k]) / _MIN_RGB_DIST,
                    float(np.partition(d_luma, k)[k]) / _MIN_LUMA_DIST)
        if score > best_score:
            best, best_score = c, score
        if score >= 1.0:
            break
    return best


def _paint(img: np.ndarray, rng: np.random.Generator, pts: np.ndarray,
           alpha: np.ndarray, box: tuple[int, int, int, int],
           mask: np.ndarray) -> None:
    """Composites one object onto ``img`` in place."""
    x0, y0, x1, y1 = box
    crop = img[y0:y1, x0:x1]
    colour = _pick_colour(rng, crop[mask])
    field = np.broadcast_to(colour, crop.shape).astype(np.float32)
    if rng.random() < 0.5:  # mild linear shading across the object
        ang = rng.uniform(0.0, 2 * math.pi)
        gy, gx = np.mgrid[0:y1 - y0, 0:x1 - x0].astype(np.float32)
        proj = gx * math.cos(ang) + gy * math.sin(ang)
        proj = (proj - proj.mean()) / max(float(np.abs(proj).max()), 1e-6)
        field = field * (1.0 + rng.uniform(0.0, 0.15) * proj)[..., None]
    a = alpha[..., None]
    crop *= 1.0 - a
    crop += field * a
    if rng.random() < 0.25:  # thin darker outline
        cv2.polylines(img, [_to_cv(pts)], True,
                      tuple(float(v) for v in colour * 0.55), 1, cv2.LINE_AA,
                      _SHIFT)


# --------------------------------------------------------------------------
# one sample
# --------------------------------------------------------------------------
def _streams(seed: int, split: str,
             index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (geometry, appearance) generators of one image."""
    ss = np.random.SeedSequence([seed, _SPLIT_CODES[split], index])
    geo, app = ss.spawn(2)
    return np.random.default_rng(geo), np.random.default_rng(app)


def render_sample(seed: int, split: str, index: int,
                  size: int = 192) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Renders one image and its (COCO-style, id-less) annotations.

    Args:
        seed: Dataset seed (non-negative).
        split: ``'train'`` or ``'val'``.
        index: Image index inside the split.
        size: Image side in px.

    Returns:
        ``(image, objects)``: uint8 RGB array ``(size, size, 3)`` and a list of
        dicts with ``category_id``, ``bbox`` ``[x, y, w, h]``, ``area`` and
        ``segmentation`` (one polygon), all rounded to 2 decimals, in paint
        order.
    """
    geo, app = _streams(seed, split, index)
    img = _background(app, size)
    _draw_clutter(img, app, n_lines=int(app.integers(0, 9)),
                  n_curves=int(app.integers(0, 4)),
                  n_dots=int(app.integers(0, 26)), max_thickness=2)

    placed: list[dict[str, Any]] = []
    for _ in range(int(geo.integers(1, MAX_OBJECTS + 1))):
        cls_idx = int(geo.integers(len(CLASSES)))
        shape = _sample_shape(CLASSES[cls_idx], geo, size)
        w, h = shape.max(axis=0)
        for _try in range(MAX_PLACEMENT_TRIES):
            offset = np.array([geo.uniform(_BORDER, size - _BORDER - w),
                               geo.uniform(_BORDER, size - _BORDER - h)])
            pts = shape + offset
            alpha, box = _rasterise(pts, size)
            x0, y0, x1, y1 = box
            mask = alpha >= 0.5
            covered = [int((o['visible'][y0:y1, x0:x1] & mask).sum())
                       for o in placed]
            if all(o['n_visible'] - c >= MIN_VISIBLE_FRAC * o['n_full']
                   for o, c in zip(placed, covered)):
                break
        else:
            continue  # no admissible placement: skip this object
        for o, c in zip(placed, covered):
            o['visible'][y0:y1, x0:x1] &= ~mask
            o['n_visible'] -= c
        visible = np.zeros((size, size), dtype=bool)
        visible[y0:y1, x0:x1] = mask
        n_full = int(mask.sum())
        placed.append(dict(cls_idx=cls_idx, pts=pts, visible=visible,
                           n_full=n_full, n_visible=n_full))
        _paint(img, app, pts, alpha, box, mask)

    _draw_clutter(img, app, n_lines=int(app.integers(0, 3)), n_curves=0,
                  n_dots=int(app.integers(0, 8)), max_thickness=1)
    if app.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), app.uniform(0.3, 0.8))
    img += app.standard_normal(img.shape, dtype=np.float32) * np.float32(
        app.uniform(1.5, 6.0))
    image = (np.clip(img, 0.0, 255.0) + 0.5).astype(np.uint8)

    objects = []
    for o in placed:
        if o['n_visible'] < MIN_VISIBLE_FRAC * o['n_full']:
            continue  # cannot happen by construction; kept as the stated rule
        pts = o['pts']
        (bx0, by0), (bx1, by1) = pts.min(axis=0), pts.max(axis=0)
        objects.append({
            'category_id': o['cls_idx'] + 1,
            'bbox': [round(float(bx0), 2), round(float(by0), 2),
                     round(float(bx1 - bx0), 2), round(float(by1 - by0), 2)],
            'area': round(_polygon_area(pts), 2),
            'segmentation': [[round(float(v), 2) for v in pts.reshape(-1)]],
        })
    return image, objects


# --------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------
def _dump_json(obj: Any, path: Path, indent: int | None = None) -> None:
    """Writes canonical (sorted, fixed separators) JSON."""
    seps = (',', ':') if indent is None else (',', ': ')
    path.write_text(
        json.dumps(obj, sort_keys=True, separators=seps, indent=indent,
                   ensure_ascii=True) + '\n', encoding='ascii')


def _generate_split(root: Path, split: str, num: int, seed: int,
                    size: int) -> dict[str, Any]:
    """Writes one split's images and annotation file; returns its stats."""
    img_dir = root / split
    img_dir.mkdir(parents=True)
    images, annotations = [], []
    per_class = {c: 0 for c in CLASSES}
    per_image = [0] * (MAX_OBJECTS + 1)
    side_bins = [10, 16, 24, 32, 48, 64, 96, 10 ** 9]
    side_hist = [0] * (len(side_bins) - 1)
    area_buckets = {'small': 0, 'medium': 0, 'large': 0}  # COCO definitions
    for index in range(num):
        image, objects = render_sample(seed, split, index, size)
        file_name = f'{split}/{index:06d}.jpg'
        Image.fromarray(image).save(root / file_name, format='JPEG',
                                    quality=JPEG_QUALITY, subsampling=0)
        image_id = index + 1
        images.append({'id': image_id, 'file_name': file_name,
                       'width': size, 'height': size})
        per_image[len(objects)] += 1
        for obj in objects:
            obj.update(id=len(annotations) + 1, image_id=image_id, iscrowd=0)
            annotations.append(obj)
            per_class[CLASSES[obj['category_id'] - 1]] += 1
            long_side = max(obj['bbox'][2], obj['bbox'][3])
            for b in range(len(side_hist)):
                if long_side < side_bins[b + 1]:
                    side_hist[b] += 1
                    break
            area = obj['area']
            key = ('small' if area < 32 ** 2 else
                   'medium' if area < 96 ** 2 else 'large')
            area_buckets[key] += 1
    coco = {
        'info': {'description': 'mmdet_regptq synthetic shapes',
                 'version': str(GENERATOR_VERSION), 'seed': seed},
        'licenses': [],
        'images': images,
        'annotations': annotations,
        'categories': [{'id': i + 1, 'name': c, 'supercategory': 'shape'}
                       for i, c in enumerate(CLASSES)],
    }
    ann_dir = root / 'annotations'
    ann_dir.mkdir(exist_ok=True)
    _dump_json(coco, ann_dir / f'instances_{split}.json')
    labels = [f'{side_bins[b]}-{side_bins[b + 1]}'
              for b in range(len(side_hist) - 1)] + [f'>={side_bins[-2]}']
    return {
        'num_images': num,
        'num_annotations': len(annotations),
        'per_class': per_class,
        'objects_per_image': {str(k): v for k, v in enumerate(per_image)},
        'box_long_side_px': dict(zip(labels, side_hist)),
        'coco_area': area_buckets,
    }


def _paths(out: Path) -> dict[str, Path]:
    """Absolute paths of everything :func:`generate` writes."""
    return {
        'data_root': out,
        'meta': out / 'meta.json',
        'train_ann': out / 'annotations' / 'instances_train.json',
        'val_ann': out / 'annotations' / 'instances_val.json',
        'train_img_dir': out / 'train',
        'val_img_dir': out / 'val',
    }


def _is_up_to_date(paths: dict[str, Path], params: dict[str, int]) -> bool:
    """Whether ``paths`` hold a complete dataset made with ``params``."""
    try:
        meta = json.loads(paths['meta'].read_text(encoding='ascii'))
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict)
            and meta.get('generator_version') == GENERATOR_VERSION
            and meta.get('params') == params
            and all(p.exists() for p in paths.values()))


def generate(out_dir: str | Path, seed: int = 0, num_train: int = 1500,
             num_val: int = 300, size: int = 192,
             force: bool = False) -> dict[str, Any]:
    """Generates the synthetic dataset (idempotently) under ``out_dir``.

    If ``out_dir/meta.json`` records the same parameters and
    :data:`GENERATOR_VERSION`, nothing is written.  Otherwise the dataset is
    generated into a temporary sibling directory and renamed into place, so
    ``out_dir`` never holds a partially written dataset.  An existing
    ``out_dir`` is only replaced if it is empty or holds a ``meta.json``
    (i.e. was made by this generator).

    Args:
        out_dir: Dataset root.
        seed: Non-negative dataset seed.
        num_train: Number of training images.
        num_val: Number of validation images.
        size: Side of the square images in px (>= 64).
        force: Regenerate even if up to date.

    Returns:
        Dict with absolute ``Path`` values ``data_root``, ``meta``,
        ``train_ann``, ``val_ann``, ``train_img_dir``, ``val_img_dir``, the
        bool ``regenerated`` and the ``meta`` dict under ``'info'``.

    Raises:
        ValueError: On invalid parameters.
        FileExistsError: If ``out_dir`` is a non-empty directory that was not
            made by this generator.
    """
    for name, value in (('seed', seed), ('num_train', num_train),
                        ('num_val', num_val)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f'{name} must be a non-negative int, got {value!r}')
    if not isinstance(size, int) or size < 64:
        raise ValueError(f'size must be an int >= 64, got {size!r}')
    out = Path(out_dir).expanduser().absolute()
    params = {'seed': seed, 'num_train': num_train, 'num_val': num_val,
              'size': size}
    paths = _paths(out)
    if not force and _is_up_to_date(paths, params):
        print(f'[synthetic] {out} is up to date '
              f'(version {GENERATOR_VERSION}, {params}); skipping.')
        meta = json.loads(paths['meta'].read_text(encoding='ascii'))
        return {**paths, 'regenerated': False, 'info': meta}
    if (out.exists() and not paths['meta'].exists()
            and (not out.is_dir() or any(out.iterdir()))):
        raise FileExistsError(
            f'{out} exists and was not made by this generator; refusing to '
            'replace it')

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        stats = {split: _generate_split(tmp, split, num, seed, size)
                 for split, num in (('train', num_train), ('val', num_val))}
        meta = {
            'generator': 'mmdet_regptq.datasets.synthetic',
            'generator_version': GENERATOR_VERSION,
            'params': params,
            'classes': list(CLASSES),
            'layout': {
                'data_root': '.',
                'train': {'ann_file': 'annotations/instances_train.json',
                          'img_prefix': ''},
                'val': {'ann_file': 'annotations/instances_val.json',
                        'img_prefix': ''},
            },
            'stats': stats,
        }
        _dump_json(meta, tmp / 'meta.json', indent=2)
        if out.exists():
            old = out.with_name(f'.{out.name}.old-{os.getpid()}-'
                                f'{time.monotonic_ns()}')
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**paths, 'regenerated': True, 'info': meta}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(
        prog='python -m mmdet_regptq.datasets.synthetic',
        description='Generate the seeded synthetic COCO-format shapes '
        'detection dataset.')
    parser.add_argument('--out', default='data/synthetic',
                        help='dataset root (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-train', type=int, default=1500)
    parser.add_argument('--num-val', type=int, default=300)
    parser.add_argument('--size', type=int, default=192,
                        help='square image side in px (default: %(default)s)')
    parser.add_argument('--force', action='store_true',
                        help='regenerate even if up to date')
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        res = generate(args.out, seed=args.seed, num_train=args.num_train,
                       num_val=args.num_val, size=args.size, force=args.force)
    except (ValueError, FileExistsError) as exc:
        parser.error(str(exc))
    if res['regenerated']:
        for split, st in res['info']['stats'].items():
            print(f'[synthetic] {split}: {st["num_images"]} images, '
                  f'{st["num_annotations"]} objects, per class '
                  f'{st["per_class"]}')
        print(f'[synthetic] wrote {res["data_root"]} in '
              f'{time.perf_counter() - t0:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
