"""What 7-bit weights cost: bbox AP at W8A8 with and without ``w_reduce_range``.

``quant=dict(w_bits=8, a_bits=8, w_reduce_range=True)`` narrows every 8-bit weight grid to
symmetric ``-64..64`` so that ONNX Runtime's AVX2 u8 x s8 kernel (CPUs without VNNI)
computes the INT8 export exactly and fast (docs/deploy.md, "CPUs without AVX-512 VNNI").
Each row runs the user's path in its own subprocess: mmdet's Runner, the config's test
dataloader and CocoMetric, ``RegPTQHook`` calibrating in ``before_test``.

This chooses a setting, so it never looks at the val split: the TRAIN annotations are cut
into two disjoint slices by image id, a calibration pool (the first ``--calib-pool``
images; the hook draws its seeded ``--num-images`` from them) and the held-out images it
is scored on (the next ``--eval-images``).

    python benchmarks/reduce_range.py --detectors retinanet fcos --methods MinMax QDrop \
        --iters 100 --calib-pool 1000 --eval-images 200

Prints a table (AP, AP50, AP75 per detector / method / weight grid) and writes
``results.csv`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmdet_regptq.bench.child import RESULT_PREFIX, run_child
from mmdet_regptq.bench.metrics import bbox_metrics
from mmdet_regptq.bench.models import REPO_ROOT as ROOT
from mmdet_regptq.bench.models import SYNTHETIC_DETECTORS
from mmdet_regptq.table import Table

#: row label -> extra quant fields (beside w_bits=8, a_bits=8)
GRIDS = {'8-bit (default)': {}, 'w_reduce_range': {'w_reduce_range': True}}
FIELDS = ['detector', 'method', 'weights', 'bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75',
          'iters', 'num_images', 'calib_seconds']


def run_one(detector: str, method: str, grid: str, args: argparse.Namespace) -> dict:
    """Calibrate and evaluate one row in this process."""
    import mmdet_regptq  # noqa: F401  registers the hook
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmdet_regptq.datasets.subset import write_coco_subset
    from mmdet_regptq.registry import PTQ_METHODS

    name = SYNTHETIC_DETECTORS[detector]
    cfg = Config.fromfile(ROOT / 'configs' / 'synthetic' / f'{name}.py')
    cfg.load_from = str(ROOT / 'checkpoints' / f'{name}.pth')
    cfg.work_dir = str(Path(args.out) / detector / f'{method}_{grid.split()[0]}')
    cfg.test_dataloader.num_workers = 0
    cfg.test_dataloader.persistent_workers = False
    train = cfg.train_dataloader.dataset
    train_ann = Path(train.data_root) / train.ann_file
    pool = write_coco_subset(train_ann, args.calib_pool)
    held_out = write_coco_subset(train_ann, args.eval_images, offset=args.calib_pool)
    train.ann_file = str(pool)                            # the calibration images
    cfg.test_dataloader.dataset.ann_file = str(held_out)  # scored: other train images
    cfg.test_evaluator.ann_file = str(held_out)
    trains = getattr(PTQ_METHODS.get(method), 'trains', True)
    cfg.custom_hooks = [dict(
        type='RegPTQHook', quant=dict(w_bits=8, a_bits=8, **GRIDS[grid]),
        method=dict(type=method, **({'iters': args.iters} if trains else {})),
        calib=dict(num_images=args.num_images, batch_size=2, seed=args.seed), save=False)]
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    seconds = next((h.result['seconds'] for h in runner.hooks
                    if type(h).__name__ == 'RegPTQHook' and h.result is not None), 0.0)
    return {'detector': detector, 'method': method, 'weights': grid,
            **bbox_metrics(metrics), 'iters': args.iters if trains else 0,
            'num_images': args.num_images, 'calib_seconds': round(seconds, 1)}


def spawn(detector: str, method: str, grid: str, args: argparse.Namespace) -> dict:
    """One row in a subprocess; its log beside the results."""
    log = Path(args.out) / detector / f'{method}_{grid.split()[0]}.log'
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, '--one', detector, method, grid, '--out', args.out,
           '--iters', str(args.iters), '--num-images', str(args.num_images),
           '--seed', str(args.seed), '--calib-pool', str(args.calib_pool),
           '--eval-images', str(args.eval_images)]
    start = time.perf_counter()
    row = run_child(cmd, log, ROOT, f'{detector} {method} {grid}')
    print(f'  {detector:10s} {method:7s} {grid:16s} AP {row["bbox_mAP"]:.3f}  '
          f'(wall {time.perf_counter() - start:.0f} s)', flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--detectors', nargs='+', default=['retinanet'],
                        choices=sorted(SYNTHETIC_DETECTORS))
    parser.add_argument('--methods', nargs='+', default=['MinMax', 'QDrop'])
    parser.add_argument('--iters', type=int, default=100, help='iterations per unit')
    parser.add_argument('--num-images', type=int, default=32, help='calibration images')
    parser.add_argument('--calib-pool', type=int, default=1000,
                        help='train images (first by id) the calibration images are drawn from')
    parser.add_argument('--eval-images', type=int, default=200,
                        help='held-out train images scored: the ones after the pool')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=str(ROOT / 'work_dirs' / 'bench_reduce_range'))
    parser.add_argument('--one', nargs=3, metavar=('DETECTOR', 'METHOD', 'WEIGHTS'),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        detector, method, grid = args.one
        print(RESULT_PREFIX + json.dumps(run_one(detector, method, grid, args)), flush=True)
        return
    rows = [spawn(d, m, g, args) for d in args.detectors for m in args.methods for g in GRIDS]
    table = Table(FIELDS, rows, title='bbox AP at W8A8: default 8-bit weight grid vs '
                                      'w_reduce_range (-64..64)', digits=3)
    table.to_csv(Path(args.out) / 'results.csv')
    print(table.format())
    print(table.to_markdown())


if __name__ == '__main__':
    main()
