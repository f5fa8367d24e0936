"""The main job on the embedded default: quantize the bundled RetinaNet at W4A4.

Generates the synthetic benchmark if needed, then evaluates the bundled RetinaNet in FP
and after calibration with QDrop and with Reg-PTQ (same calibration images, same
iterations), each through mmdet's Runner + RegPTQHook + CocoMetric, on the first 100 val
images, and prints the AP table. Measured: 3.5 minutes wall on 2 idle CPU cores (FP 16 s,
QDrop 51 s, Reg-PTQ 92 s of calibration: its Fisher weights and global loss run the rest
of the network after each unit).

    python tools/main_job.py [--iters 100] [--num-images 32] [--bits w4a4]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--iters', type=int, default=100, help='iterations per unit')
    parser.add_argument('--num-images', type=int, default=32, help='calibration images')
    parser.add_argument('--bits', default='w4a4')
    parser.add_argument('--methods', nargs='+', default=['QDrop', 'RegPTQ'])
    parser.add_argument('--val-images', type=int, default=100,
                        help='evaluate on the first N val images (0: all 300)')
    args = parser.parse_args()
    from mmdet_regptq.datasets.synthetic import generate
    generate(ROOT / 'data' / 'synthetic', seed=0)
    cmd = [sys.executable, str(ROOT / 'benchmarks' / 'accuracy.py'), '--detectors', 'retinanet',
           '--methods', *args.methods, '--bits', args.bits, '--iters', str(args.iters),
           '--num-images', str(args.num_images), '--val-images', str(args.val_images),
           '--out', str(ROOT / 'work_dirs' / 'main_job')]
    sys.exit(subprocess.call(cmd, cwd=ROOT))


if __name__ == '__main__':
    main()
