"""`mim run mmdet test` as a user runs it: a malicious checkpoint never runs its payload, and
a rerun into the same work dir reuses the finished calibration (only evaluation repeats)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_safe_load import assert_refused, write_evil   # tests/ is on sys.path

ROOT = Path(__file__).resolve().parents[2]
MIM = str(Path(sys.executable).with_name('mim'))
CONFIG = 'configs/regptq/synthetic/retinanet_r18-16_fpn64_synthetic_qdrop_w4a4.py'
CHECKPOINT = 'checkpoints/retinanet_r18-16_fpn64_synthetic.pth'


def mim_test(checkpoint: str, work_dir: Path, *cfg_options: str
             ) -> subprocess.CompletedProcess:
    cmd = [MIM, 'run', 'mmdet', 'test', CONFIG, checkpoint, '--work-dir', str(work_dir)]
    if cfg_options:
        cmd += ['--cfg-options', *cfg_options]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'})


@pytest.mark.parametrize('fmt', ['legacy', 'pickle'])
def test_mim_test_refuses_a_malicious_checkpoint(tmp_path, fmt):
    marker = tmp_path / 'PAYLOAD_RAN'
    path = tmp_path / f'evil_{fmt}.pth'
    name = write_evil(path, fmt, marker)
    proc = mim_test(str(path), tmp_path / 'work')
    assert proc.returncode != 0
    assert_refused(proc.stdout + proc.stderr, name, marker)
    assert 'UnsafeCheckpointError' in proc.stderr


def test_mim_test_reuses_the_finished_calibration(synthetic_data, tmp_path):
    from mmdet_regptq.datasets.subset import write_coco_subset
    ann = write_coco_subset(synthetic_data / 'annotations' / 'instances_val.json', 8,
                            dst=tmp_path / 'val8.json')
    options = [f'test_dataloader.dataset.ann_file={ann}',
               f'test_evaluator.ann_file={ann}', 'test_dataloader.num_workers=0',
               'test_dataloader.persistent_workers=False', 'custom_hooks.0.method.iters=2',
               'custom_hooks.0.calib.num_images=2']
    work = tmp_path / 'work'
    first = mim_test(CHECKPOINT, work, *options)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = work / 'quantized.pth'
    written = saved.stat().st_mtime_ns
    again = mim_test(CHECKPOINT, work, *options)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert f'reusing the finished calibration {saved}' in log
    assert saved.stat().st_mtime_ns == written            # not calibrated, not rewritten

    def ap(text: str) -> float:
        return float(re.findall(r'coco/bbox_mAP: ([0-9.]+)', text)[-1])
    assert ap(log) == ap(first.stdout + first.stderr)
    assert torch.load(saved)['meta']['fingerprint']['weights_sha256']
