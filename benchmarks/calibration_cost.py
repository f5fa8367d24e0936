"""Calibration time of Reg-PTQ against QDrop on the bundled detectors, with a breakdown.

    python benchmarks/calibration_cost.py --detectors retinanet fcos faster-rcnn \
        --methods QDrop RegPTQ --iters 100 --num-images 32 --bits w2a4 [--rounds 2]

Each detector is built from its bundled config and trained checkpoint and calibrated on
``--num-images`` seeded train images (the calibration loader of the ``RegPTQHook``, two
images per batch) through :func:`~mmdet_regptq.engine.quantize_detector`, the path a user
takes; nothing is evaluated. The methods alternate within each round and the order is
reversed every other round (QDrop, Reg-PTQ, Reg-PTQ, QDrop, ... with ``--rounds``), so a
changing machine load hits both alike; the ratio is taken per round.

A method is a registered name or ``LABEL=TYPE{json options}``, as in
``benchmarks/accuracy.py`` (``'RegPTQ-g8=RegPTQ{"schedule": {"global_interval": 8}}'``).

Per run it reports the calibration's wall time (as ``quantize_detector`` reports it), the
process's CPU time (the better measure on a shared machine: it leaves out the waiting for
a core), and the CPU time split into exclusive buckets (summed over the units, and with
``--units`` per unit): see :class:`BucketProfiler`. ``digest`` hashes the calibrated
state: two runs of the same method and seed that print the same digest ended with
identical tensors.

``--profile FILE`` writes a cProfile of the runs of the methods after the first
(``pstats``).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKETS = ('init', 'tail_prepare', 'capture', 'fisher_fwd', 'fisher_fgic', 'fisher_bwd',
           'local_fwd', 'local_bwd', 'tail_fwd', 'fgic', 'tail_bwd', 'evaluate', 'cache_io',
           'other')


class BucketProfiler:
    """Exclusive CPU seconds per bucket and per unit, from wrappers installed on the
    calibration's own functions (a stack: a wrapped call inside another is taken out of
    its parent's bucket). CPU time of the process (``time.process_time``), not wall time:
    on a loaded machine it does not count the time spent waiting for a core.

    Buckets (what runs in them):

    - ``init``: scale initialisation (Reg-PTQ's Lp search, LLAQ install, activation scales);
    - ``tail_prepare``: the tail's stored prefix outputs per unit (the quantized prefix
      forward per batch; the FP final outputs on the first unit);
    - ``capture``: the unit's cached inputs / targets (FP and quantized prefix passes);
    - ``fisher_fwd`` / ``fisher_fgic`` / ``fisher_bwd``: Reg-PTQ's Fisher weights, per batch
      a tail forward, the global loss (decode + filter + loss) and the backward to the unit
      outputs;
    - ``local_fwd`` / ``local_bwd``: iterations without the tail: the unit forward + local
      loss terms, the backward;
    - ``tail_fwd`` / ``fgic`` / ``tail_bwd``: iterations with ``L_G``: the tail forward (unit
      included), the global loss, the backward through tail and unit;
    - ``evaluate``: the before / after reconstruction error;
    - ``cache_io``: copies out of the activation caches (``detach_to``, spilled reads);
    - ``other``: the rest (optimiser steps, hardening, logging, hooks).
    """

    def __init__(self) -> None:
        self.units: dict[str, dict[str, float]] = {}
        self.current = '(init)'
        self._stack: list[list] = []
        self.with_tail = False

    def _add(self, bucket: str, seconds: float) -> None:
        unit = self.units.setdefault(self.current, dict.fromkeys(BUCKETS, 0.0))
        unit[bucket] += seconds

    def top(self) -> str:
        return self._stack[-1][0] if self._stack else 'other'

    @contextlib.contextmanager
    def bucket(self, name: str) -> Iterator[None]:
        now = time.process_time()
        if self._stack:
            self._add(self._stack[-1][0], now - self._stack[-1][1])
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.process_time()
            top = self._stack.pop()
            self._add(top[0], now - top[1])
            if self._stack:
                self._stack[-1][1] = now

    def totals(self) -> dict[str, float]:
        out = dict.fromkeys(BUCKETS, 0.0)
        for unit in self.units.values():
            for k, v in unit.items():
                out[k] += v
        return out

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import importlib

        import torch

        from mmdet_regptq.calib import fgic as fgic_mod
        from mmdet_regptq.calib.methods import base as base_mod
        from mmdet_regptq.calib.tail import TailRunner
        recon_mod = importlib.import_module('mmdet_regptq.calib.reconstruct')
        capture_mod = importlib.import_module('mmdet_regptq.calib.capture')
        tail_mod = importlib.import_module('mmdet_regptq.calib.tail')
        cache_mod = importlib.import_module('mmdet_regptq.calib.cache')
        prof = self
        saved: list[tuple[Any, str, Any]] = []

        def wrap(owner: Any, name: str, bucket: Any, unit_arg: int | None = None) -> None:
            fn = getattr(owner, name)
            saved.append((owner, name, owner.__dict__[name] if isinstance(owner, type)
                          else fn))

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if unit_arg is not None:
                    prof.current = args[unit_arg].name
                label = bucket(prof.top()) if callable(bucket) else bucket
                if label is None:
                    return fn(*args, **kwargs)
                with prof.bucket(label):
                    return fn(*args, **kwargs)
            setattr(owner, name, wrapper)

        in_fisher = lambda top: top.startswith('fisher')   # noqa: E731
        wrap(TailRunner, 'prepare', 'tail_prepare', unit_arg=1)
        wrap(base_mod, 'capture_unit', 'capture', unit_arg=1)
        wrap(capture_mod, '_output_grads', 'fisher_fwd')
        wrap(torch.autograd, 'grad',
             lambda top: 'fisher_bwd' if in_fisher(top) else None)
        for name in ('__call__', 'loss_decoded', 'decode_target'):
            wrap(fgic_mod.FGICLoss, name,
                 lambda top: 'fisher_fgic' if in_fisher(top) else 'fgic')
        wrap(fgic_mod.GlobalLoss, '__call__', 'fgic')
        wrap(TailRunner, 'run', lambda top: 'fisher_fwd' if in_fisher(top) else 'tail_fwd')
        wrap(recon_mod._Loop, 'evaluate', 'evaluate')
        wrap(torch.Tensor, 'backward',
             lambda top: 'tail_bwd' if prof.with_tail else 'local_bwd')
        for mod in (recon_mod, capture_mod, tail_mod):
            wrap(mod, 'detach_to', 'cache_io')
        wrap(cache_mod.ActivationCache, '__getitem__', 'cache_io')
        context = recon_mod._Loop.context

        def timed_context(loop: Any, draw: int, iteration: int, mix: bool,
                          with_tail: bool = True, local_draw: str = 'batch') -> Any:
            prof.with_tail = with_tail and loop.tail is not None
            if prof.top() == 'evaluate':
                return context(loop, draw, iteration, mix, with_tail, local_draw)
            with prof.bucket('tail_fwd' if prof.with_tail else 'local_fwd'):
                return context(loop, draw, iteration, mix, with_tail, local_draw)

        score = recon_mod._Loop.score

        def timed_score(loop: Any, ctx: Any, regularizers: bool = True) -> Any:
            if prof.top() == 'evaluate':
                return score(loop, ctx, regularizers)
            with prof.bucket('tail_fwd' if prof.with_tail else 'local_fwd'):
                return score(loop, ctx, regularizers)

        saved.append((recon_mod._Loop, 'context', context))
        saved.append((recon_mod._Loop, 'score', score))
        recon_mod._Loop.context = timed_context
        recon_mod._Loop.score = timed_score
        try:
            yield
        finally:
            for owner, name, value in reversed(saved):
                setattr(owner, name, value)


def calibrate_once(detector: str, method: str, args: argparse.Namespace,
                   profile: cProfile.Profile | None = None) -> dict[str, Any]:
    """Build, quantize and calibrate one detector with one method; times per bucket."""
    import torch
    from mmengine.config import Config
    from mmengine.logging import MMLogger

    import mmdet_regptq  # noqa: F401  registers the methods and adapters
    from mmdet_regptq.bench.models import SYNTHETIC_DETECTORS
    from mmdet_regptq.bench.specs import parse_bits, parse_method
    from mmdet_regptq.calib import build_method
    from mmdet_regptq.deploy import build_detector
    from mmdet_regptq.engine import quantize_detector
    from mmdet_regptq.engine.calib_data import build_calib_loader

    stem = SYNTHETIC_DETECTORS[detector]
    cfg = Config.fromfile(str(ROOT / 'configs' / 'synthetic' / f'{stem}.py'))
    torch.manual_seed(0)
    model = build_detector(cfg, str(ROOT / 'checkpoints' / f'{stem}.pth'))
    label, kind, options = parse_method(method)
    w_bits, a_bits = parse_bits(args.bits)
    method_obj = build_method(dict(type=kind, iters=args.iters, progress=False, **options))
    loader = build_calib_loader(cfg, num_images=args.num_images, batch_size=2, seed=args.seed)
    prof = BucketProfiler()
    logger = MMLogger.get_instance(f'calibration_cost_{label}', log_level='WARNING')
    init = method_obj.init_scales

    def timed_init(*a: Any, **k: Any) -> None:
        with prof.bucket('init'):
            init(*a, **k)

    method_obj.init_scales = timed_init
    cpu = time.process_time()
    with prof.installed(), prof.bucket('other'):
        if profile is not None:
            profile.enable()
        try:
            result = quantize_detector(model, loader, quant=dict(w_bits=w_bits, a_bits=a_bits),
                                       method=method_obj, seed=args.seed, logger=logger)
        finally:
            if profile is not None:
                profile.disable()
    cpu = time.process_time() - cpu
    units = {name: {k: round(v, 3) for k, v in b.items()} for name, b in prof.units.items()}
    return dict(detector=detector, method=label, bits=args.bits, iters=args.iters,
                num_images=args.num_images, calib_seconds=round(result['seconds'], 2),
                cpu_seconds=round(cpu, 2),
                phases={k: round(v, 2) for k, v in prof.totals().items()}, units=units,
                digest=_state_digest(model))


def _state_digest(model: Any) -> str:
    """A hash of the calibrated state (every float tensor of the state dict): two runs
    with the same result give the same digest."""
    import hashlib

    import torch
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if isinstance(value, torch.Tensor):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _print_units(rows: list[dict], detector: str, r: int, base: str) -> None:
    """Per unit: seconds of each method, the ratio to ``base``, the split of the others."""
    runs = [x for x in rows if x['detector'] == detector and x['round'] == r]
    ref = next(x for x in runs if x['method'] == base)
    for x in runs:
        if x is ref:
            continue
        print(f'\n{detector} r{r}: per unit, {x["method"]} against {base} (CPU s; '
              f'{x["method"]} split)')
        shown = [b for b in BUCKETS if x['phases'][b] >= 0.005 * x['cpu_seconds']]
        print(f'{"unit":28s} {base[:8]:>8s} {x["method"][:8]:>8s} {"ratio":>6s}  '
              + ' '.join(f'{b[:11]:>11s}' for b in shown))
        for name, buckets in x['units'].items():
            mine = sum(buckets.values())
            theirs = sum(ref['units'].get(name, {}).values())
            ratio = f'{mine / theirs:6.2f}' if theirs > 0 else '     -'
            print(f'{name[:28]:28s} {theirs:8.2f} {mine:8.2f} {ratio}  '
                  + ' '.join(f'{buckets[b]:11.2f}' for b in shown))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--detectors', nargs='+', default=['retinanet', 'fcos', 'faster-rcnn'],
                        choices=['retinanet', 'fcos', 'faster-rcnn'])
    parser.add_argument('--methods', nargs='+', default=['QDrop', 'RegPTQ'])
    parser.add_argument('--bits', default='w2a4')
    parser.add_argument('--iters', type=int, default=100)
    parser.add_argument('--num-images', type=int, default=32)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--rounds', type=int, default=1,
                        help='repeat the alternation of the methods this many times')
    parser.add_argument('--units', action='store_true', help='print the per-unit split')
    parser.add_argument('--profile',
                        help='write a cProfile of the methods after the first here')
    parser.add_argument('--json', help='append one JSON line per run to this file')
    args = parser.parse_args(argv)
    profile = cProfile.Profile() if args.profile else None
    rows = []
    print(f'uptime: {_uptime()}', flush=True)
    for detector in args.detectors:
        for r in range(args.rounds):
            # alternate the order between rounds: neither method always runs first
            order = list(enumerate(args.methods))
            if r % 2:
                order.reverse()
            for i, method in order:
                row = calibrate_once(detector, method, args,
                                     profile if (i > 0 or len(args.methods) == 1) else None)
                row['round'] = r
                row['load'] = round(os.getloadavg()[0], 2)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != 'units'}), flush=True)
                if args.json:
                    with open(args.json, 'a', encoding='utf-8') as f:
                        f.write(json.dumps(row) + '\n')
    if profile is not None:
        profile.dump_stats(args.profile)
    base = args.methods[0].split('=')[0]
    print(f'\ncalibration wall and CPU seconds, ratio to {base} (same round), {args.bits}, '
          f'{args.iters} it., {args.num_images} images; uptime: {_uptime()}')
    for detector in args.detectors:
        for r in range(args.rounds):
            ref = next(x for x in rows if x['detector'] == detector and x['round'] == r
                       and x['method'] == base)
            for x in rows:
                if x['detector'] == detector and x['round'] == r:
                    ratio = x['calib_seconds'] / ref['calib_seconds']
                    cpu_ratio = x['cpu_seconds'] / ref['cpu_seconds']
                    print(f'{detector:12s} r{r} {x["method"]:24s} wall {x["calib_seconds"]:7.1f} s '
                          f'{ratio:5.2f}x  CPU {x["cpu_seconds"]:7.1f} s {cpu_ratio:5.2f}x  '
                          f'load {x["load"]:.2f}  digest {x["digest"]}\n    CPU s: '
                          + ' '.join(f'{k}={v:.1f}' for k, v in x['phases'].items() if v))
            if args.units:
                _print_units(rows, detector, r, base)
    return 0


def _uptime() -> str:
    load = os.getloadavg()
    return f'load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}'


if __name__ == '__main__':
    raise SystemExit(main())
