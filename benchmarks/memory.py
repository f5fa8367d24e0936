"""Peak memory of a calibration: RetinaNet R50 (mmdet zoo config, random init) at 800x1333.

Runs the calibration twice, each in its own process so that each peak RSS is its own:
under the default activation-cache cap (``PTQMethod(cache_max_bytes=2 GiB)``: past it,
cached activations spill to disk) and with the cap halved. Prints peak RSS, the RSS before
calibration (model + prepared batches), the peak size of the spill folder and the time.

    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --num-images 4 --size 400 667 --iters 2   # quick
    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py --units 5

``--units N`` stops after the first ``N`` reconstruction units (printed as such): the stem
and ``layer1`` run at stride 4, where a unit's cached inputs, FP inputs and outputs are
largest (R50 at 800x1333: 2.2 GB per tensor kind for 32 images), so they set the peak;
the other units repeat the same cache at 1/2-1/32 the size and only add CPU hours.

The images are the bundled synthetic ones resized (no keep-ratio) to ``--size``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO_CONFIG = 'retinanet/retinanet_r50_fpn_1x_coco.py'
DEFAULT_CAP = 2 * 1024 ** 3     # PTQMethod's default cache_max_bytes


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class PeakSampler(threading.Thread):
    """Samples the spill folder size every ``interval`` seconds; keeps the peak."""

    def __init__(self, spill_dir: Path, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.spill_dir, self.interval = spill_dir, interval
        self.peak_spill = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.peak_spill = max(self.peak_spill, _dir_bytes(self.spill_dir))

    def stop(self) -> None:
        self._halt.set()
        self.join()


class _EnoughUnits(Exception):
    """Raised by the unit callback after ``--units`` units."""


def child(args: argparse.Namespace) -> dict:
    """One calibration in this process; returns the measurements."""
    import torch
    from mmcv.transforms import Compose
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import mmdet_regptq  # noqa: F401
    from mmdet.registry import MODELS, TRANSFORMS
    from mmdet.utils import register_all_modules
    from mmdet_regptq.engine.ptq import quantize_detector
    from mmdet_regptq.registry import PTQ_METHODS
    from mmdet_regptq.zoo import offline_cfg, synthetic_images, zoo_root

    torch.set_num_threads(args.threads)
    register_all_modules()
    init_default_scope('mmdet')
    MMLogger.get_instance('mmengine', log_level='WARNING')
    cfg = Config.fromfile(str(zoo_root() / ZOO_CONFIG))
    torch.manual_seed(0)
    model = MODELS.build(offline_cfg(copy.deepcopy(cfg.model)))
    model.init_weights()
    model.eval()
    height, width = args.size
    pipeline = Compose([TRANSFORMS.build(t) for t in [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(width, height), keep_ratio=False),
        dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                              'scale_factor'))]])
    images = synthetic_images(args.num_images, split='train')
    data = [pipeline(dict(img_path=str(p), img_id=i)) for i, p in enumerate(images)]
    batches = [pseudo_collate(data[i:i + args.batch_size])
               for i in range(0, len(data), args.batch_size)]
    method = args.method or ('RegPTQ' if PTQ_METHODS.get('RegPTQ') else 'QDrop')
    rss_before = _rss_bytes()
    with tempfile.TemporaryDirectory(prefix='regptq_spill_') as spill:
        sampler = PeakSampler(Path(spill))
        sampler.start()
        done = []

        def count_units(index: int, unit: object, stats: object) -> None:
            done.append(index)
            if args.units and len(done) >= args.units:
                raise _EnoughUnits

        start = time.perf_counter()
        try:
            quantize_detector(model, batches, quant=dict(w_bits=4, a_bits=4), method=dict(
                type=method, iters=args.iters, cache_max_bytes=args.cap, spill_dir=spill,
                progress=False, log_interval=0), logger=MMLogger.get_instance(
                    'memory', log_level='WARNING'), on_unit_end=count_units)
        except _EnoughUnits:
            pass
        seconds = time.perf_counter() - start
        sampler.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(cap=args.cap, method=method, peak_rss=peak, rss_before=rss_before,
                peak_spill=sampler.peak_spill, seconds=seconds, units=len(done),
                input=f'{height}x{width}', num_images=args.num_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1333), metavar=('H', 'W'))
    parser.add_argument('--num-images', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--iters', type=int, default=20, help='iterations per unit')
    parser.add_argument('--method', default=None, help='default: RegPTQ (QDrop if missing)')
    parser.add_argument('--units', type=int, default=0,
                        help='stop after this many units (0: all; see the docstring)')
    parser.add_argument('--cap', type=int, default=None,
                        help='cache cap in bytes (default: both the default and half of it)')
    parser.add_argument('--threads', type=int, default=int(os.environ.get('OMP_NUM_THREADS',
                                                                          '1')))
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print('RESULT ' + json.dumps(child(args)), flush=True)
        return
    caps = [args.cap] if args.cap else [DEFAULT_CAP, DEFAULT_CAP // 2]
    rows = []
    for cap in caps:
        cmd = [sys.executable, __file__, '--child', '--cap', str(cap), '--size',
               *map(str, args.size), '--num-images', str(args.num_images), '--batch-size',
               str(args.batch_size), '--iters', str(args.iters), '--threads',
               str(args.threads), '--units', str(args.units)] + (
                   ['--method', args.method] if args.method else [])
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith('RESULT ')), None)
        if line is None:
            sys.exit(f'calibration with cap {cap} failed:\n{out.stderr[-3000:]}')
        rows.append(json.loads(line[len('RESULT '):]))
    gib = float(1024 ** 3)
    print(f'RetinaNet R50 (random init), {rows[0]["input"]}, {rows[0]["num_images"]} images, '
          f'batch {args.batch_size}, {rows[0]["method"]} {args.iters} iters/unit, '
          + (f'first {rows[0]["units"]} units' if args.units else f'{rows[0]["units"]} units'))
    print(f'| cache cap | peak RSS | RSS before calibration | peak spill on disk | time |')
    print('|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["cap"] / gib:.2f} GiB | {r["peak_rss"] / gib:.2f} GiB | '
              f'{r["rss_before"] / gib:.2f} GiB | {r["peak_spill"] / gib:.2f} GiB | '
              f'{r["seconds"]:.0f} s |')


if __name__ == '__main__':
    main()
