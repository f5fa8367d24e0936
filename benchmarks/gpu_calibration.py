"""Calibration time of RetinaNet R50-FPN at the paper's settings, on one GPU and on all of them.

    python benchmarks/gpu_calibration.py [--methods QDrop,RegPTQ] [--num-images 256]
        [--iters 2000] [--size 800x1333] [--batch-size 2] [--units N] [--procs auto]
        [--device cuda] [--csv work_dirs/benchmark_gpu/calibration.csv]

The model is mmdet's zoo config ``retinanet_r50_fpn_1x_coco.py`` with random weights
(``init_cfg=None``: nothing is downloaded; the weights do not change the work done). The
calibration images are ``--num-images`` seeded random images of ``--size``, through the
detector's own data preprocessor, ``--batch-size`` per iteration; W4A4, ``--iters``
iterations per unit, each method's defaults otherwise. Per method it prints the time of
each unit (capture + reconstruction: from the end of the previous unit, the first one
from the end of the activation-scale initialisation) and the total (scale
initialisation + all units; the image preprocessing and module swapping before it are
reported apart).

``--procs auto`` times one GPU, then, when the machine has more, all of them: the script
re-runs itself under ``torchrun`` (NCCL), the images split over the processes and the
gradients of the learned quantization parameters averaged every iteration
(:mod:`mmdet_regptq.calib.dist`); ``--batch-size`` stays the images per iteration over
all processes. ``--units N`` stops each method after its first N units (the total then
covers those only). ``--device cpu --iters 2 --num-images 2 --units 2 --size 96x128
--model retinanet`` checks the script on a CPU in seconds (``--model`` takes a bundled
small detector instead of R50, which needs about a minute on a CPU before its first
unit). Writes one CSV row per unit.

Memory: at 800x1333 a unit's activation cache (inputs, FP inputs, outputs, and Reg-PTQ's
output gradients) of the first backbone units is about 0.3 GB per image, so 256 images
on one process spill most of it to disk beyond ``--cache-gib`` (each of the unit cache
and the tail-input cache); over N processes each holds 1/N of it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ('QDrop', 'RegPTQ', 'BRECQ', 'AdaRound', 'PDQuant')
MODELS = ('r50', 'retinanet', 'fcos', 'frcnn')


class _Enough(Exception):
    """Raised after ``--units`` units (ends the calibration of one method)."""


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'--size {text!r}: allowed HxW, e.g. 800x1333') from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f'--size {text!r}: H and W must be >= 32')
    return h, w


def _methods(text: str) -> list[str]:
    names = [m for m in text.split(',') if m]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f'--methods {text!r}: allowed {", ".join(METHODS)}')
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--methods', type=_methods, default=['QDrop', 'RegPTQ'])
    parser.add_argument('--model', default='r50', choices=MODELS,
                        help='r50 (the measurement) or a bundled small detector (script checks)')
    parser.add_argument('--num-images', type=int, default=256)
    parser.add_argument('--iters', type=int, default=2000, help='iterations per unit')
    parser.add_argument('--size', type=_size, default=(800, 1333), help='HxW')
    parser.add_argument('--batch-size', type=int, default=2,
                        help='images per iteration (over all processes)')
    parser.add_argument('--units', type=int, default=0, help='stop after N units (0: all)')
    parser.add_argument('--procs', default='auto',
                        help="'auto' (one GPU, then all GPUs if more than one) or a count")
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'],
                        help='cpu only checks the script on a machine without a GPU')
    parser.add_argument('--cache-gib', type=float, default=32.0,
                        help='activation cache kept in memory per unit before spilling to disk')
    parser.add_argument('--csv', default='work_dirs/benchmark_gpu/calibration.csv')
    parser.add_argument('--result-json', default=None, help=argparse.SUPPRESS)  # torchrun child
    args = parser.parse_args(argv)
    for name in ('num_images', 'iters', 'batch_size'):
        if getattr(args, name) < (0 if name == 'iters' else 1):
            parser.error(f'--{name.replace("_", "-")}={getattr(args, name)} is out of range')
    if args.procs != 'auto' and not (args.procs.isdigit() and int(args.procs) >= 1):
        parser.error(f"--procs {args.procs!r}: allowed 'auto' or a count >= 1")
    return args


def images(num: int, size: tuple[int, int], batch_size: int, seed: int = 0) -> list[dict]:
    """This process's calibration batches, as mmdet's loader yields them: image ``i`` is
    seeded random uint8 ``[3, H, W]`` (``seed + i``), split over the processes as the
    calibration loader splits real images."""
    from mmdet.structures import DetDataSample

    from mmdet_regptq.calib.dist import shard_indices

    h, w = size
    mine, per_rank = shard_indices(range(num), batch_size)
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1.0, 1.0))
    out = []
    for start in range(0, len(mine), per_rank):
        imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(seed + i))
                for i in mine[start:start + per_rank]]
        out.append({'inputs': imgs, 'data_samples': [DetDataSample(metainfo=dict(meta))
                                                     for _ in imgs]})
    return out


def time_method(name: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Calibrate a fresh ``--model`` with method ``name``; the times of its steps."""
    from mmdet_regptq.bench.models import model_config
    from mmdet_regptq.calib import build_method
    from mmdet_regptq.deploy import build_detector
    from mmdet_regptq.engine import quantize_detector

    torch.manual_seed(0)   # the same random weights in every process
    model = build_detector(model_config(args.model), None, device=device)
    method = build_method(dict(type=name, iters=args.iters, progress=False,
                               cache_max_bytes=int(args.cache_gib * (1 << 30))))
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    marks: dict[str, Any] = {'units': [], 'num_units': 0}

    def now() -> float:
        sync()
        return time.perf_counter()

    init_scales, find_units = method.init_scales, method.find_units

    def timed_init(*a: Any, **k: Any) -> None:
        marks['init_start'] = now()
        init_scales(*a, **k)
        marks['last'] = marks['init_end'] = now()

    def counted_units(*a: Any, **k: Any) -> list:
        units = find_units(*a, **k)
        marks['num_units'] = max(marks['num_units'], len(units))
        return units

    def unit_end(index: int, unit: Any, stats: Any) -> None:
        t = now()
        marks['units'].append((index, unit.name, unit.kind, t - marks['last']))
        marks['last'] = t
        if args.units and len(marks['units']) >= args.units:
            raise _Enough

    method.init_scales, method.find_units = timed_init, counted_units
    start = now()
    try:
        quantize_detector(model, images(args.num_images, args.size, args.batch_size),
                          quant=dict(w_bits=4, a_bits=4), method=method, on_unit_end=unit_end)
    except _Enough:
        pass
    return dict(method=name, prepare_s=marks['init_start'] - start,
                init_s=marks['init_end'] - marks['init_start'],
                total_s=marks['last'] - marks['init_start'], units=marks['units'],
                num_units=marks['num_units'])


def run_here(args: argparse.Namespace) -> list[dict]:
    """Every method in this process (one rank of a torchrun job, or alone)."""
    from mmengine.dist import get_dist_info

    import mmdet_regptq  # noqa: F401  (registers the methods and the adapters)
    device = args.device
    if device == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    results = []
    for name in args.methods:
        result = time_method(name, args, device)
        result['processes'] = get_dist_info()[1]
        results.append(result)
    return results


def run_torchrun(args: argparse.Namespace, argv: list[str], nproc: int) -> list[dict]:
    """This script under torchrun on ``nproc`` processes; rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / 'result.json'
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        keep = [a for a in argv if not a.startswith('--procs')]
        if '--procs' in argv:   # drop the value of a separate '--procs N'
            i = argv.index('--procs')
            keep = argv[:i] + argv[i + 2:]
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
               f'--master_port={port}', __file__, *keep, '--procs', '1',
               '--result-json', str(result)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
        code = subprocess.call(cmd, env=env)
        if code != 0:
            raise SystemExit(f'torchrun on {nproc} processes failed ({code})')
        return json.loads(result.read_text())


def report(results: list[dict], args: argparse.Namespace, where: str) -> None:
    from mmdet_regptq.table import Table

    h, w = args.size
    for r in results:
        rows = [dict(unit=i + 1, name=n, kind=k, seconds=round(s, 2))
                for i, n, k, s in r['units']]
        print('\n' + Table.from_rows(rows, f"{r['method']}, {r['processes']} process(es) on "
                                           f'{where}: seconds per unit').format())
    summary = [dict(method=r['method'], processes=r['processes'], images=args.num_images,
                    size=f'{h}x{w}', iters=args.iters,
                    units=f"{len(r['units'])}/{r['num_units']}",
                    prepare_s=round(r['prepare_s'], 1), scale_init_s=round(r['init_s'], 1),
                    calibration_s=round(r['total_s'], 1),
                    calibration_h=round(r['total_s'] / 3600, 3)) for r in results]
    model = 'RetinaNet R50-FPN' if args.model == 'r50' else f'bundled {args.model}'
    print('\n' + Table.from_rows(summary, f'calibration time, {model} W4A4 '
                                          f'({where})').format())
    table = Table(['method', 'processes', 'device', 'images', 'size', 'iters', 'unit', 'name',
                   'kind', 'seconds'])
    for r in results:
        for i, n, k, s in r['units']:
            table.add(method=r['method'], processes=r['processes'], device=where,
                      images=args.num_images, size=f'{h}x{w}', iters=args.iters, unit=i + 1,
                      name=n, kind=k, seconds=round(s, 3))
    print(f'\nCSV: {table.to_csv(args.csv)}')


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('benchmarks/gpu_calibration.py --device cuda: no CUDA device '
                         '(torch.cuda.is_available() is False); run it on a GPU machine')
    if args.result_json:   # a torchrun child: join the process group, report from rank 0
        from mmengine.dist import get_rank, init_dist

        import mmdet_regptq  # noqa: F401  (its compat lets mmengine's launcher run without CUDA)
        init_dist('pytorch', backend='nccl' if args.device == 'cuda' else 'gloo')
        results = run_here(args)
        if get_rank() == 0:
            Path(args.result_json).write_text(json.dumps(results))
        return 0
    count = torch.cuda.device_count() if args.device == 'cuda' else 1
    nproc = count if args.procs == 'auto' else int(args.procs)
    where = (f'{torch.cuda.get_device_name()}' if args.device == 'cuda' else 'CPU')
    print(f'device: {where} x {count}, torch {torch.__version__}')
    results = run_here(args) if args.procs == 'auto' or nproc == 1 else []
    if nproc > 1:
        results += run_torchrun(args, argv, nproc)
    report(results, args, where)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
