"""One process vs MMEngine's distributed launcher: same quantized model, same AP.

Runs mmdet's own ``tools/test.py`` with ``RegPTQHook`` twice on a bundled detector:
once as a single process and once under ``torchrun`` with 2 processes (gloo backend on
CPU, ``--launcher pytorch``: the path users take on multi-GPU machines). Every rank
calibrates on the same seeded images; rank 0 writes ``quantized.pth``; the test images are
split across the ranks and CocoMetric gathers them. Prints both APs and whether the two
``quantized.pth`` files hold identical tensors.

    nice -n 15 .venv/bin/python benchmarks/multiprocess.py [--detector NAME]
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DETECTORS = ('retinanet_r18-16_fpn64_synthetic', 'fcos_r18-16_fpn64_synthetic',
             'faster-rcnn_r18-16_fpn64_synthetic')

CONFIG = '''_base_ = {base!r}
custom_imports = dict(imports=['mmdet_regptq'], allow_failed_imports=False)
custom_hooks = [dict(type='RegPTQHook', quant=dict(w_bits=4, a_bits=4),
                     method=dict(type={method!r}, iters={iters}, progress=False),
                     calib=dict(num_images={num_images}, batch_size=2))]
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                      dataset=dict(ann_file={ann!r}))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={ann_abs!r})
test_evaluator = val_evaluator
env_cfg = dict(dist_cfg=dict(backend='gloo'))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ap(work_dir: Path) -> float:
    logs = sorted(work_dir.glob('*/*.log'))
    text = logs[-1].read_text() if logs else ''
    found = re.findall(r'coco/bbox_mAP: ([0-9.]+)', text)
    if not found:
        raise RuntimeError(f'no bbox_mAP in {logs[-1] if logs else work_dir}')
    return float(found[-1])


def _same_quantized(a: Path, b: Path) -> list[str]:
    from mmdet_regptq.engine.checkpoint import read_quantized
    ca, cb = read_quantized(a), read_quantized(b)
    diff = sorted(set(ca['state_dict']) ^ set(cb['state_dict']))
    diff += [k for k in ca['state_dict'] if k in cb['state_dict']
             and not torch.equal(ca['state_dict'][k], cb['state_dict'][k])]
    for key, entry in ca['packed'].items():
        other = cb['packed'].get(key)
        if other is None or any(not torch.equal(entry[f], other[f])
                                for f in ('codes', 'scale', 'zero_point')):
            diff.append(key)
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--detector', default=DETECTORS[0], choices=DETECTORS,
                        help='bundled detector (config + checkpoints/<name>.pth)')
    parser.add_argument('--method', default='QDrop')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--num-images', type=int, default=8, help='calibration images')
    parser.add_argument('--val-images', type=int, default=100, help='evaluated val images')
    parser.add_argument('--nproc', type=int, default=2)
    parser.add_argument('--out', default=str(ROOT / 'work_dirs' / 'multiprocess'))
    args = parser.parse_args()
    base_cfg = ROOT / 'configs' / 'synthetic' / f'{args.detector}.py'
    ckpt = str(ROOT / 'checkpoints' / f'{args.detector}.pth')
    from mmdet_regptq.datasets.subset import write_coco_subset
    data = ROOT / 'data' / 'synthetic'
    ann = write_coco_subset(data / 'annotations' / 'instances_val.json', args.val_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / f'{args.detector}_multiprocess.py'
    cfg.write_text(CONFIG.format(base=str(base_cfg), method=args.method, iters=args.iters,
                                 num_images=args.num_images,
                                 ann=str(ann.relative_to(data)), ann_abs=str(ann)))
    import mmdet
    test_py = str(Path(mmdet.__file__).parent / '.mim' / 'tools' / 'test.py')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    runs = {
        '1 process': [sys.executable, test_py, str(cfg), ckpt, '--work-dir', str(out / 'single')],
        f'{args.nproc} processes (torchrun, gloo)': [
            sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={args.nproc}',
            f'--master_port={_free_port()}', test_py, str(cfg), ckpt, '--launcher', 'pytorch',
            '--work-dir', str(out / 'dist')],
    }
    results = {}
    for name, cmd in runs.items():
        with tempfile.TemporaryFile('w+') as log:
            code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            if code != 0:
                log.seek(0)
                sys.exit(f'{name} failed ({code}):\n{log.read()[-4000:]}')
        work_dir = out / ('single' if name == '1 process' else 'dist')
        results[name] = (_ap(work_dir), work_dir / 'quantized.pth')
    (ap1, q1), (ap2, q2) = results.values()
    diff = _same_quantized(q1, q2)
    print(f'{args.detector} (bundled), W4A4 {args.method} {args.iters} iters/unit, '
          f'{args.num_images} calibration images, {args.val_images} val images')
    print('| run | bbox mAP |\n|---|---|')
    for name, (ap, _) in results.items():
        print(f'| {name} | {ap:.4f} |')
    print('quantized.pth identical: ' + ('yes' if not diff else f'NO ({len(diff)} tensors '
                                         f'differ, e.g. {diff[:3]})'))
    print('same AP: ' + ('yes' if ap1 == ap2 else 'NO'))
    sys.exit(0 if not diff and ap1 == ap2 else 1)


if __name__ == '__main__':
    main()
