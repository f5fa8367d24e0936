"""CPU seconds per calibration unit of one zoo config, split into buckets.

The zoo sweep's own run (``mmdet_regptq.zoo.probe.run_one``: random init, 2 synthetic
images, W4A4, Reg-PTQ with ``--iters`` iterations per unit) with the
:class:`BucketProfiler` of ``benchmarks/calibration_cost.py`` installed around the
calibration: one line per unit as it finishes (Fisher pass, ``L_G`` tail iterations, the
unit's own iterations, prefix stores, ...), then the totals. Where the depth goes:

    OMP_NUM_THREADS=1 python benchmarks/zoo_unit_cost.py \
        cornernet/cornernet_hourglass104_8xb6-210e-mstest_coco.py --max-tail-units 0
    OMP_NUM_THREADS=1 python benchmarks/zoo_unit_cost.py \
        cornernet/cornernet_hourglass104_8xb6-210e-mstest_coco.py --max-tail-units 32

``--limit`` stops after that many wall seconds (the totals are printed anyway). The first
unit's ``other`` holds everything before it (quantization, unit search, scale init).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibration_cost import BucketProfiler  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='a zoo config, relative to mmdet/.mim/configs')
    parser.add_argument('--max-tail-units', type=int, default=32,
                        help="Reg-PTQ's schedule.max_tail_units (0: no bound)")
    parser.add_argument('--max-size', type=int, default=320)
    parser.add_argument('--iters', type=int, default=2)
    parser.add_argument('--limit', type=int, default=0, help='wall seconds (0: none)')
    args = parser.parse_args(argv)

    import mmdet_regptq.engine.ptq as ptq
    from mmdet_regptq.zoo import probe

    prof = BucketProfiler()
    quantize_detector = ptq.quantize_detector
    start = [time.process_time()]

    def profiled(model: Any, batches: Any, *, on_unit_end: Any = None, **kwargs: Any) -> Any:
        def unit_end(k: int, unit: Any, stats: Any) -> None:
            buckets = prof.units.get(unit.name, {})
            print(f'{k:4d} {unit.name[:48]:48s} {sum(buckets.values()):7.2f} s: '
                  + ' '.join(f'{b}={v:.2f}' for b, v in buckets.items() if v >= 0.01)
                  + f' | total {time.process_time() - start[0]:.0f} s', flush=True)
            if on_unit_end is not None:
                on_unit_end(k, unit, stats)

        with prof.installed(), prof.bucket('other'):
            start[0] = time.process_time()
            return quantize_detector(model, batches, on_unit_end=unit_end, **kwargs)

    ptq.quantize_detector = profiled
    if args.limit:
        def stop(*_: Any) -> None:
            raise SystemExit(f'stopped after {args.limit} s wall')
        signal.signal(signal.SIGALRM, stop)
        signal.alarm(args.limit)
    try:
        row = probe.run_one(args.config, max_size=args.max_size, iters=args.iters,
                            max_tail_units=args.max_tail_units or None)
        print({k: v for k, v in row.items() if k != 'traceback'})
    finally:
        print('CPU s by bucket:', {k: round(v, 1) for k, v in prof.totals().items() if v})
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
