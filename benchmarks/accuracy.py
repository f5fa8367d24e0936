"""bbox AP of the bundled detectors: FP and each PTQ method at each bit width.

Every run goes through the real path a user takes: mmdet's Runner with the config's test
dataloader and CocoMetric, the checkpoint loaded by the Runner, and ``RegPTQHook``
calibrating in ``before_test``. Each run is a subprocess, so its peak RSS is its own.

    python benchmarks/accuracy.py --detectors retinanet --methods MinMax QDrop RegPTQ \
        --bits w4a8 w4a4 w3a3 w2a4 --iters 200 --num-images 64

``--detectors yolov5n`` runs the official Ultralytics YOLOv5n (read from the real-data
folder ``../shared/realdata`` or ``$REGPTQ_REALDATA``, converted once into ``--out``) on 64
real COCO val images, calibrated on a seeded subset (``--num-images``) of 128 COCO train
images (docs/results/yolov5.md).

A method is a registered name (``QDrop``) or ``LABEL=TYPE{json options}`` for a variant,
e.g. ``'RegPTQ-noGlobal=RegPTQ{"schedule": {"global_loss": false}}'``
(``benchmarks/ablation.py`` runs the Reg-PTQ component ablation this way). ``--reuse``
keeps the rows whose log already holds a result (a grid interrupted half-way goes on where
it stopped).

Prints a table, and writes ``results.csv`` (row by row) and ``accuracy.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

from mmdet_regptq.bench.child import RESULT_PREFIX, read_result, run_child
from mmdet_regptq.bench.metrics import bbox_metrics
from mmdet_regptq.bench.models import REAL_DETECTORS, real_checkpoint
from mmdet_regptq.bench.models import REPO_ROOT as ROOT
from mmdet_regptq.bench.models import SYNTHETIC_DETECTORS
from mmdet_regptq.bench.specs import parse_bits, parse_method
from mmdet_regptq.table import Table

#: detector name -> config / checkpoint stem under configs/synthetic, checkpoints
DETECTORS = dict(SYNTHETIC_DETECTORS)
FIELDS = ['detector', 'method', 'bits', 'bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'iters',
          'num_images', 'calib_seconds', 'peak_rss_mb', 'seed']


def run_one(detector: str, method: str, bits: str, args: argparse.Namespace) -> dict:
    """Evaluate one (detector, method, bits) in this process; returns the row."""
    import resource

    import mmdet_regptq  # noqa: F401  registers the hook
    from mmengine.config import Config
    from mmengine.runner import Runner

    if detector in REAL_DETECTORS:
        cfg, checkpoint = real_detector(detector, Path(args.out))
        cfg.load_from = checkpoint
    else:
        name = DETECTORS[detector]
        cfg = Config.fromfile(ROOT / 'configs' / 'synthetic' / f'{name}.py')
        cfg.load_from = str(ROOT / 'checkpoints' / f'{name}.pth')
    label, kind, options = parse_method(method)
    cfg.work_dir = str(Path(args.out) / detector / f'{label}_{bits}')
    cfg.test_dataloader.num_workers = 0
    cfg.test_dataloader.persistent_workers = False
    if args.val_images:  # CocoMetric scores every image of its ann_file: use a subset file
        from mmdet_regptq.datasets.subset import write_coco_subset
        ann = write_coco_subset(Path(cfg.test_evaluator.ann_file), args.val_images,
                                offset=args.val_offset)
        cfg.test_dataloader.dataset.ann_file = str(ann)
        cfg.test_evaluator.ann_file = str(ann)
    hook, trains = None, False
    if method != 'FP':
        w_bits, a_bits = parse_bits(bits)
        from mmdet_regptq.registry import PTQ_METHODS
        trains = getattr(PTQ_METHODS.get(kind), 'trains', True)
        method_cfg = dict(type=kind, **({'iters': args.iters} if trains else {}), **options)
        hook = dict(type='RegPTQHook', quant=dict(w_bits=w_bits, a_bits=a_bits),
                    method=method_cfg,
                    calib=dict(num_images=args.num_images, batch_size=2, seed=args.seed),
                    save=False)
        cfg.custom_hooks = [hook]
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    calib_seconds = 0.0
    for h in runner.hooks:
        if type(h).__name__ == 'RegPTQHook' and h.result is not None:
            calib_seconds = h.result['seconds']
    return {
        'detector': detector, 'method': label, 'bits': bits if method != 'FP' else 'fp32',
        **bbox_metrics(metrics),
        'iters': args.iters if method != 'FP' and trains else 0,
        'num_images': args.num_images if method != 'FP' else 0,
        'calib_seconds': round(calib_seconds, 1),
        'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        'seed': args.seed,
    }


def real_detector(detector: str, out: Path) -> tuple:
    """Config and converted checkpoint (written under ``out`` once) of a real detector."""
    from mmengine.config import Config

    converted = real_checkpoint(detector, out)
    cfg = Config.fromfile(ROOT / REAL_DETECTORS[detector][0])
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    return cfg, str(converted)


def spawn(detector: str, method: str, bits: str, args: argparse.Namespace) -> dict:
    """Run one combination in a subprocess (own peak RSS, own logs)."""
    log_dir = Path(args.out) / detector
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f'{parse_method(method)[0]}_{bits}.log'
    if args.reuse and log.is_file() and (row := read_result(log)) is not None:
        print(f'  {detector:12s} {row["method"]:9s} {row["bits"]:6s} AP '
              f'{row["bbox_mAP"]:.3f}  (reused {log})', flush=True)
        return row
    cmd = [sys.executable, __file__, '--one', detector, method, bits, '--out', args.out,
           '--iters', str(args.iters), '--num-images', str(args.num_images),
           '--seed', str(args.seed), '--val-images', str(args.val_images),
           '--val-offset', str(args.val_offset)]
    start = time.perf_counter()
    row = run_child(cmd, log, ROOT, f'{detector} {method} {bits}')
    print(f'  {detector:12s} {method:9s} {row["bits"]:6s} AP {row["bbox_mAP"]:.3f}  '
          f'calib {row["calib_seconds"]:7.1f} s  RSS {row["peak_rss_mb"]:7.1f} MB  '
          f'(wall {time.perf_counter() - start:.0f} s)', flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: AP per method, one group per (detector, bits)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    groups = sorted({(r['detector'], r['bits']) for r in rows if r['method'] != 'FP'})
    methods = [m for m in dict.fromkeys(r['method'] for r in rows) if m != 'FP']
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(methods)) / 2), 4))
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        values = [next((r['bbox_mAP'] for r in rows if (r['detector'], r['bits'], r['method'])
                        == (d, b, method)), 0.0) for d, b in groups]
        ax.bar([i + j * width for i in range(len(groups))], values, width, label=method)
    for i, (d, _) in enumerate(groups):
        fp = next((r['bbox_mAP'] for r in rows if r['detector'] == d and r['method'] == 'FP'), None)
        if fp is not None:
            ax.hlines(fp, i - 0.1, i + 0.9, colors='k', linestyles='dashed')
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f'{d}\n{b}' for d, b in groups], fontsize=8)
    ax.set_ylabel('bbox mAP (dashed: FP)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--detectors', nargs='+', default=list(DETECTORS),
                        choices=list(DETECTORS) + list(REAL_DETECTORS))
    parser.add_argument('--methods', nargs='+',
                        default=['MinMax', 'AdaRound', 'AdaQuant', 'BRECQ', 'QDrop', 'PDQuant',
                                 'RegPTQ'])
    parser.add_argument('--bits', nargs='+', default=['w4a8', 'w4a4', 'w3a3', 'w2a4'])
    parser.add_argument('--iters', type=int, default=200, help='iterations per unit')
    parser.add_argument('--num-images', type=int, default=64, help='calibration images')
    parser.add_argument('--val-images', type=int, default=0, help='0 = the whole val split')
    parser.add_argument('--val-offset', type=int, default=0,
                        help='skip this many val images first: a held-out slice for choosing '
                             'settings (e.g. --val-offset 100 --val-images 200), disjoint from '
                             "the reported table's first --val-images")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-fp', action='store_true', help='skip the FP rows')
    parser.add_argument('--reuse', action='store_true',
                        help='keep the result of a run whose log already has one')
    parser.add_argument('--out', default=str(ROOT / 'work_dirs' / 'bench_accuracy'))
    parser.add_argument('--from-csv', nargs='+', metavar='CSV',
                        help='run nothing: merge these results.csv files (e.g. a grid run in '
                             'pieces), print the table and draw --out/accuracy.png')
    parser.add_argument('--one', nargs=3, metavar=('DETECTOR', 'METHOD', 'BITS'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for bits in args.bits:
        parse_bits(bits)
    for method in args.methods:
        parse_method(method)
    if args.one:
        row = run_one(*args.one, args)
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        rows = read_csv_rows(args.from_csv)
        plot(rows, out / 'accuracy.png')
        print_table(rows)
        print(f'\nwrote {out / "accuracy.png"}')
        return
    rows: list[dict] = []
    csv_path = out / 'results.csv'

    def record(row: dict) -> None:
        rows.append(row)
        Table(FIELDS, rows).to_csv(csv_path)

    print(f'{len(args.detectors)} detectors x {len(args.methods)} methods x {len(args.bits)} '
          f'bit widths; {args.iters} iters/unit, {args.num_images} calibration images', flush=True)
    for det in args.detectors:
        if not args.no_fp:
            record(spawn(det, 'FP', 'fp32', args))
        for bits in args.bits:
            for method in args.methods:
                record(spawn(det, method, bits, args))
    plot(rows, out / 'accuracy.png')
    print_table(rows)
    print(f'\nwrote {csv_path} and {out / "accuracy.png"}')


def print_table(rows: list[dict]) -> None:
    """The rows as a Markdown table, AP on the 0-100 scale."""
    table = Table(['detector', 'method', 'bits', 'AP', 'AP50', 'AP75', 'calib s',
                   'peak RSS MB'], digits=1)
    for r in rows:
        table.add(**{'detector': r['detector'], 'method': r['method'], 'bits': r['bits'],
                     'AP': 100 * r['bbox_mAP'], 'AP50': 100 * r['bbox_mAP_50'],
                     'AP75': 100 * r['bbox_mAP_75'], 'calib s': r['calib_seconds'],
                     'peak RSS MB': r['peak_rss_mb']})
    print('\n' + table.to_markdown())


def read_csv_rows(paths: list[str]) -> list[dict]:
    """Rows of ``results.csv`` files, numbers parsed; a later file's row replaces an
    earlier one with the same (detector, method, bits)."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        with open(path, newline='') as f:
            for row in csv.DictReader(f):
                for key in ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'calib_seconds',
                            'peak_rss_mb'):
                    row[key] = float(row[key])
                merged[(row['detector'], row['method'], row['bits'])] = row
    return list(merged.values())


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', '2')
    main()
