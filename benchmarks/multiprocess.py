"""Data-parallel calibration under MMEngine's launcher: 1 process x 1 thread vs N x 1 thread.

Runs mmdet's own ``tools/test.py`` with ``RegPTQHook`` twice on a bundled detector, at the
same calibration images and iterations per unit: once as a single process and once under
``torchrun`` with ``--nproc`` processes (gloo backend on CPU, ``--launcher pytorch``: the
path users take on multi-GPU machines). Under torchrun the ranks share the calibration
(each rank caches its own part of the images, the gradients of the learned quantization
parameters are averaged every iteration, the ranks' results are checked to be identical,
rank 0 writes ``quantized.pth``) and the evaluation (CocoMetric gathers the test images).
Every process runs one thread (``OMP_NUM_THREADS=1``). Prints, per run, the wall time of
the whole command, the calibration's wall and CPU time (the engine's ``calibration took``
log line, rank 0's process) and the bbox mAP, then the ratios and whether the goal
(calibration <= 0.6x, AP within 0.3 points) is met. On cores shared with other work the
wall times mostly measure the sharing (the processes wait for each other at every
iteration); the CPU time per process shows the work each one did.

    nice -n 15 .venv/bin/python benchmarks/multiprocess.py [--detector NAME] [--method QDrop]
        [--bits w4a4] [--iters 100] [--num-images 16] [--nproc 2]

``--detector yolov5n``: the official YOLOv5n (read from the real-data folder,
``../shared/realdata`` or ``$REGPTQ_REALDATA``, converted once into ``--out``) at 640,
calibrated on the coco128 train images and evaluated on the 64 val images of
``configs/yolov5/yolov5_n_coco128.py`` (``--val-images`` does not apply).

Measure on otherwise idle cores: N processes need N free cores.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmdet_regptq.bench.models import REAL_DETECTORS, real_checkpoint
from mmdet_regptq.bench.specs import parse_bits


ROOT = Path(__file__).resolve().parents[1]
DETECTORS = ('retinanet_r18-16_fpn64_synthetic', 'fcos_r18-16_fpn64_synthetic',
             'faster-rcnn_r18-16_fpn64_synthetic')

CONFIG = '''_base_ = {base!r}
custom_imports = dict(imports=['mmdet_regptq'], allow_failed_imports=False)
custom_hooks = [dict(type='RegPTQHook', quant=dict(w_bits={w_bits}, a_bits={a_bits}),
                     method=dict(type={method!r}, iters={iters}, progress=False),
                     calib=dict(num_images={num_images}, batch_size={batch_size}),
                     recalibrate=True)]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
'''
#: the bundled detectors: the first ``--val-images`` synthetic val images
VAL_SUBSET = '''val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                      dataset=dict(ann_file={ann!r}))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={ann_abs!r})
test_evaluator = val_evaluator
'''
#: a real detector keeps its config's data, without worker processes
NO_WORKERS = '''train_dataloader = dict(num_workers=0, persistent_workers=False)
test_dataloader = dict(num_workers=0, persistent_workers=False)
val_dataloader = test_dataloader
'''


def detector_files(detector: str, out: Path, val_images: int) -> tuple[Path, str, str]:
    """(base config, checkpoint, config lines for the data) of a detector."""
    if detector in REAL_DETECTORS:
        return (ROOT / REAL_DETECTORS[detector][0], str(real_checkpoint(detector, out)),
                NO_WORKERS)
    from mmdet_regptq.datasets.subset import write_coco_subset
    data = ROOT / 'data' / 'synthetic'
    ann = write_coco_subset(data / 'annotations' / 'instances_val.json', val_images)
    return (ROOT / 'configs' / 'synthetic' / f'{detector}.py',
            str(ROOT / 'checkpoints' / f'{detector}.pth'),
            VAL_SUBSET.format(ann=str(ann.relative_to(data)), ann_abs=str(ann)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _log(work_dir: Path) -> str:
    logs = sorted(work_dir.glob('*/*.log'))
    if not logs:
        raise RuntimeError(f'no log under {work_dir}')
    return logs[-1].read_text()


def _ap(text: str) -> float:
    found = re.findall(r'coco/bbox_mAP: ([0-9.]+)', text)
    if not found:
        raise RuntimeError('no coco/bbox_mAP in the run\'s log')
    return float(found[-1])


def _calib_seconds(text: str) -> tuple[float, float]:
    """(wall, CPU of the logging process = rank 0) seconds of the calibration."""
    found = re.findall(r'calibration took ([0-9.]+) s \(CPU time of this process ([0-9.]+) s',
                       text)
    if not found:
        raise RuntimeError('no "calibration took" line in the run\'s log')
    return float(found[-1][0]), float(found[-1][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--detector', default=DETECTORS[0],
                        choices=DETECTORS + tuple(REAL_DETECTORS),
                        help='bundled detector (config + checkpoints/<name>.pth) or yolov5n')
    parser.add_argument('--method', default='QDrop', help='a PTQ method name')
    parser.add_argument('--bits', type=parse_bits, default=(4, 4), help='wXaY (default w4a4)')
    parser.add_argument('--iters', type=int, default=100, help='iterations per unit')
    parser.add_argument('--num-images', type=int, default=16, help='calibration images')
    parser.add_argument('--batch-size', type=int, default=2,
                        help='calibration images per iteration (split over the processes)')
    parser.add_argument('--val-images', type=int, default=100, help='evaluated val images')
    parser.add_argument('--nproc', type=int, default=2)
    parser.add_argument('--out', default=str(ROOT / 'work_dirs' / 'multiprocess'))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg, ckpt, data_lines = detector_files(args.detector, out, args.val_images)
    cfg = out / f'{args.detector}_multiprocess.py'
    w_bits, a_bits = args.bits
    cfg.write_text(CONFIG.format(base=str(base_cfg), method=args.method, iters=args.iters,
                                 num_images=args.num_images, batch_size=args.batch_size,
                                 w_bits=w_bits, a_bits=a_bits) + data_lines)
    import mmdet
    test_py = str(Path(mmdet.__file__).parent / '.mim' / 'tools' / 'test.py')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    runs = {
        '1 process': ('single', [sys.executable, test_py, str(cfg), ckpt]),
        f'{args.nproc} processes (torchrun, gloo)': ('dist', [
            sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={args.nproc}',
            f'--master_port={_free_port()}', test_py, str(cfg), ckpt, '--launcher', 'pytorch']),
    }
    rows = {}
    for name, (sub, cmd) in runs.items():
        work_dir = out / sub
        with tempfile.TemporaryFile('w+') as log:
            tic = time.perf_counter()
            code = subprocess.call(cmd + ['--work-dir', str(work_dir)], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
            wall = time.perf_counter() - tic
            if code != 0:
                log.seek(0)
                sys.exit(f'{name} failed ({code}):\n{log.read()[-4000:]}')
        text = _log(work_dir)
        rows[name] = (wall, *_calib_seconds(text), _ap(text))
    (wall1, cal1, cpu1, ap1), (wall2, cal2, cpu2, ap2) = rows.values()
    kind = 'real' if args.detector in REAL_DETECTORS else 'bundled'
    val = '64 coco128 val' if kind == 'real' else f'{args.val_images} synthetic val'
    print(f'{args.detector} ({kind}), W{w_bits}A{a_bits} {args.method}, {args.iters} '
          f'iters/unit, {args.num_images} calibration images (batch {args.batch_size}), '
          f'{val} images, 1 thread per process')
    print('| run | wall s (whole command) | calibration s | calibration CPU s (rank 0) '
          '| bbox mAP |\n|---|---|---|---|---|')
    for name, (wall, cal, cpu, ap) in rows.items():
        print(f'| {name} | {wall:.1f} | {cal:.1f} | {cpu:.1f} | {ap:.4f} |')
    ratio = cal2 / cal1
    print(f'calibration time ratio: {ratio:.2f}x (CPU time per process {cpu2 / cpu1:.2f}x); '
          f'whole command: {wall2 / wall1:.2f}x')
    print(f'AP difference: {100 * (ap2 - ap1):+.1f} points')
    met = ratio <= 0.6 and abs(ap2 - ap1) <= 0.003
    print('goal (<= 0.6x calibration time, AP within 0.3): ' + ('met' if met else 'NOT met'))
    sys.exit(0 if met else 1)


if __name__ == '__main__':
    main()
