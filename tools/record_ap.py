"""Evaluate a bundled checkpoint with `mim run mmdet test` and record its AP.

Writes the full-val AP and the first-100-val AP (the figure CI re-checks) into
``checkpoints/bundled.json``; prints both.

    python tools/record_ap.py retinanet_r18-16_fpn64_synthetic
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / 'checkpoints' / 'bundled.json'


def mim_test_ap(config: str, checkpoint: str, ann: Path | None = None) -> float:
    """bbox mAP printed by ``mim run mmdet test`` (optionally on a subset ann file)."""
    with tempfile.TemporaryDirectory() as work:
        cmd = [str(Path(sys.executable).with_name('mim')), 'run', 'mmdet', 'test', config,
               checkpoint, '--work-dir', work]
        if ann is not None:
            cmd += ['--cfg-options', f'test_dataloader.dataset.ann_file={ann}',
                    f'test_evaluator.ann_file={ann}']
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                             env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    return float(re.findall(r'coco/bbox_mAP: ([0-9.]+)', out.stdout + out.stderr)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('names', nargs='+')
    args = parser.parse_args()
    from mmdet_regptq.datasets.subset import write_coco_subset
    subset = write_coco_subset(ROOT / 'data/synthetic/annotations/instances_val.json', 100)
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    for name in args.names:
        config = f'configs/synthetic/{name}.py'
        checkpoint = f'checkpoints/{name}.pth'
        entry = {'config': config, 'checkpoint': checkpoint,
                 'val_ap': mim_test_ap(config, checkpoint),
                 'val_first100_ap': mim_test_ap(config, checkpoint, subset)}
        record[name] = entry
        print(name, json.dumps(entry))
        RECORD.write_text(json.dumps(record, indent=2, sort_keys=True) + '\n')


if __name__ == '__main__':
    main()
