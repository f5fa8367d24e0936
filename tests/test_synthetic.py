"""Tests of the seeded synthetic COCO dataset generator.

The module is loaded from its file path so that the tests neither depend on
``mmdet_regptq/__init__.py`` nor on MMCV / MMDetection being importable.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_MODULE_PATH = (Path(__file__).resolve().parents[1] / 'mmdet_regptq' /
                'datasets' / 'synthetic.py')

NUM_TRAIN, NUM_VAL, SIZE = 20, 10, 128


def _load_module():
    name = '_regptq_synthetic_under_test'
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


synthetic = _load_module()


def _make(root: Path, seed: int = 0, **kwargs) -> dict:
    kwargs.setdefault('num_train', NUM_TRAIN)
    kwargs.setdefault('num_val', NUM_VAL)
    kwargs.setdefault('size', SIZE)
    return synthetic.generate(root, seed=seed, **kwargs)


@pytest.fixture(scope='module')
def pair(tmp_path_factory) -> tuple[dict, dict]:
    """The same dataset generated twice into different directories."""
    base = tmp_path_factory.mktemp('synthetic')
    return _make(base / 'a'), _make(base / 'b')


def test_layout(pair):
    res, _ = pair
    root = res['data_root']
    assert res['regenerated'] is True
    for key in ('meta', 'train_ann', 'val_ann', 'train_img_dir',
                'val_img_dir'):
        assert res[key].exists(), key
        assert res[key].is_relative_to(root)
    assert res['train_ann'] == root / 'annotations' / 'instances_train.json'
    assert res['val_ann'] == root / 'annotations' / 'instances_val.json'
    assert len(list((root / 'train').glob('*.jpg'))) == NUM_TRAIN
    assert len(list((root / 'val').glob('*.jpg'))) == NUM_VAL
    # No temporary or backup directories are left next to the dataset.
    assert sorted(p.name for p in root.parent.iterdir()) == ['a', 'b']


def test_same_seed_is_byte_identical(pair):
    a, b = pair
    for key in ('train_ann', 'val_ann', 'meta'):
        assert a[key].read_bytes() == b[key].read_bytes(), key
    for split in ('train', 'val'):
        for img in sorted((a['data_root'] / split).iterdir()):
            other = b['data_root'] / split / img.name
            assert img.read_bytes() == other.read_bytes(), img.name


def test_different_seed_differs(pair, tmp_path):
    a, _ = pair
    c = _make(tmp_path / 'c', seed=1)
    assert a['train_ann'].read_bytes() != c['train_ann'].read_bytes()
    assert ((a['train_img_dir'] / '000000.jpg').read_bytes() !=
            (c['train_img_dir'] / '000000.jpg').read_bytes())


def test_images_independent_of_count(pair):
    """Image i is the same whatever the number of images generated."""
    a, _ = pair
    img, objs = synthetic.render_sample(0, 'train', NUM_TRAIN - 1, SIZE)
    coco = json.loads(a['train_ann'].read_text())
    anns = [x for x in coco['annotations'] if x['image_id'] == NUM_TRAIN]
    assert [x['bbox'] for x in anns] == [x['bbox'] for x in objs]
    stored = np.asarray(Image.open(
        a['train_img_dir'] / f'{NUM_TRAIN - 1:06d}.jpg').convert('RGB'))
    assert stored.shape == img.shape == (SIZE, SIZE, 3)
    # JPEG q95 4:4:4 is close to lossless on average.
    assert np.abs(stored.astype(int) - img.astype(int)).mean() < 3.0


def test_boxes_and_categories(pair):
    a, _ = pair
    hi = synthetic.MAX_BOX_FRAC * SIZE
    for key in ('train_ann', 'val_ann'):
        coco = json.loads(a[key].read_text())
        cats = coco['categories']
        assert len(cats) >= 5
        assert [c['id'] for c in cats] == list(range(1, len(cats) + 1))
        assert [c['name'] for c in cats] == list(synthetic.CLASSES)
        assert coco['annotations']
        for ann in coco['annotations']:
            x, y, w, h = ann['bbox']
            assert 10.0 - 0.011 <= w <= hi + 0.011, ann
            assert 10.0 - 0.011 <= h <= hi + 0.011, ann
            assert x >= 0 and y >= 0, ann
            assert x + w <= SIZE + 1e-6 and y + h <= SIZE + 1e-6, ann
            assert ann['iscrowd'] == 0
            assert 0 < ann['area'] <= (w + 0.01) * (h + 0.01)  # rounding
            poly = np.asarray(ann['segmentation'][0]).reshape(-1, 2)
            assert len(poly) >= 3
            np.testing.assert_allclose(poly.min(0), [x, y], atol=0.011)
            np.testing.assert_allclose(poly.max(0), [x + w, y + h],
                                       atol=0.021)
            for v in (x, y, w, h, ann['area'], *poly.ravel()):
                assert round(v, 2) == v


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # pycocotools/numpy 2
def test_pycocotools_loads(pair):
    from pycocotools.coco import COCO

    a, _ = pair
    for key, num in (('train_ann', NUM_TRAIN), ('val_ann', NUM_VAL)):
        coco = COCO(str(a[key]))
        assert len(coco.getImgIds()) == num
        assert len(coco.getCatIds()) == len(synthetic.CLASSES)
        raw = json.loads(a[key].read_text())
        assert len(coco.getAnnIds()) == len(raw['annotations'])
        # Between 1 and MAX_OBJECTS objects per image.
        for img_id in coco.getImgIds():
            n = len(coco.getAnnIds(imgIds=[img_id]))
            assert 1 <= n <= synthetic.MAX_OBJECTS
            info = coco.loadImgs([img_id])[0]
            assert (a['data_root'] / info['file_name']).is_file()
            assert info['file_name'].startswith(key.split('_')[0] + '/')
        ann = coco.loadAnns(coco.getAnnIds())[0]
        mask = coco.annToMask(ann)
        assert mask.shape == (SIZE, SIZE)
        assert abs(int(mask.sum()) - ann['area']) <= 0.25 * ann['area'] + 20


def test_idempotent(tmp_path):
    first = _make(tmp_path / 'd')
    assert first['regenerated'] is True
    files = [first['meta'], first['train_ann'], first['val_ann'],
             first['train_img_dir'] / '000000.jpg']
    before = [p.stat().st_mtime_ns for p in files]
    second = _make(tmp_path / 'd')
    assert second['regenerated'] is False
    assert [p.stat().st_mtime_ns for p in files] == before
    # Different parameters regenerate (and replace the old dataset).
    third = _make(tmp_path / 'd', num_val=3)
    assert third['regenerated'] is True
    assert len(list(third['val_img_dir'].iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d']


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / 'e').mkdir()
    (tmp_path / 'e' / 'precious.txt').write_text('keep me')
    with pytest.raises(FileExistsError):
        _make(tmp_path / 'e')
    assert (tmp_path / 'e' / 'precious.txt').read_text() == 'keep me'


def test_coco_subset_with_offset_is_disjoint_from_the_first_images(synthetic_data, tmp_path):
    """--val-offset: a held-out slice for choosing settings, disjoint from the table's."""
    from mmdet_regptq.datasets.subset import write_coco_subset
    src = synthetic_data / 'annotations' / 'instances_val.json'
    first = json.loads(write_coco_subset(src, 5, dst=tmp_path / 'a.json').read_text())
    held = json.loads(write_coco_subset(src, 5, dst=tmp_path / 'b.json', offset=5).read_text())
    ids_first = {im['id'] for im in first['images']}
    ids_held = {im['id'] for im in held['images']}
    assert len(ids_first) == len(ids_held) == 5 and not ids_first & ids_held
    assert all(a['image_id'] in ids_held for a in held['annotations'])
    total = len(json.loads(src.read_text())['images'])
    with pytest.raises(ValueError, match='num_images'):
        write_coco_subset(src, total, dst=tmp_path / 'c.json', offset=1)


def test_coco_subset_survives_concurrent_writers(synthetic_data, tmp_path):
    """Two benchmark jobs started together write the same subset file: each writer uses
    its own temporary file (a shared '<dst>.tmp' made the later rename fail)."""
    from concurrent.futures import ThreadPoolExecutor

    from mmdet_regptq.datasets.subset import write_coco_subset
    src = synthetic_data / 'annotations' / 'instances_val.json'
    dst = tmp_path / 'same.json'

    def write(_):
        dst.unlink(missing_ok=True)       # every writer really writes
        return write_coco_subset(src, 50, dst=dst)

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(write, range(40))) == {dst}
    assert len(json.loads(dst.read_text())['images']) == 50
    assert not list(tmp_path.glob('*.tmp'))
