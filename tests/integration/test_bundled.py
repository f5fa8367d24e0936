"""The bundled detectors through mmdet's own test tool (`mim run mmdet test`).

The recorded APs live in checkpoints/bundled.json, written from the commands in
checkpoints/README.md; these tests re-run the same evaluation and compare.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RECORD = json.loads((ROOT / 'checkpoints' / 'bundled.json').read_text())
MIM = str(Path(sys.executable).with_name('mim'))


def mim_test(config: str, checkpoint: str, work_dir: Path, *cfg_options: str) -> str:
    cmd = [MIM, 'run', 'mmdet', 'test', config, checkpoint, '--work-dir', str(work_dir)]
    if cfg_options:
        cmd += ['--cfg-options', *cfg_options]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def bbox_map(log: str) -> float:
    found = re.findall(r'coco/bbox_mAP: ([0-9.]+)', log)
    assert found, log[-3000:]
    return float(found[-1])


def subset_options(ann: Path) -> list[str]:
    return [f'test_dataloader.dataset.ann_file={ann}', f'test_evaluator.ann_file={ann}',
            'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']


@pytest.mark.parametrize('name', sorted(RECORD))
def test_bundled_checkpoint_is_small_and_loads_safely(name):
    entry = RECORD[name]
    path = ROOT / entry['checkpoint']
    assert path.stat().st_size <= 10 * 2**20
    ckpt = torch.load(path, map_location='cpu')  # weights_only=True: no allow-listing needed
    assert set(ckpt) == {'state_dict', 'meta'}
    assert ckpt['meta']['note'].startswith(('mim train', 'stage 1: mim train'))


@pytest.mark.parametrize('name', sorted(RECORD))
def test_mim_test_reproduces_recorded_ap(name, val_subset, tmp_path):
    entry = RECORD[name]
    log = mim_test(entry['config'], entry['checkpoint'], tmp_path, *subset_options(val_subset))
    assert bbox_map(log) == pytest.approx(entry['val_first100_ap'], abs=0.002)


def test_hook_calibrates_and_evaluates_through_mim(val_subset, tmp_path):
    """RegPTQHook via custom_imports + custom_hooks, exactly as a user runs it."""
    entry = RECORD['retinanet_r18-16_fpn64_synthetic']
    config = 'configs/regptq/synthetic/retinanet_r18-16_fpn64_synthetic_qdrop_w4a4.py'
    log = mim_test(config, entry['checkpoint'], tmp_path, *subset_options(val_subset),
                   'custom_hooks.0.method.iters=4', 'custom_hooks.0.calib.num_images=4')
    ap = bbox_map(log)
    assert 0.0 < ap <= entry['val_first100_ap'] + 0.02
    assert 'bbox_head.cls_convs.0.conv' in log  # the layer table was logged
    saved = torch.load(tmp_path / 'quantized.pth', map_location='cpu')
    assert saved['meta']['method'] == 'QDrop'
    assert not list(tmp_path.glob('*.tmp'))
