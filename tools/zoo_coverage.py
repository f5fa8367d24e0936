"""Model-zoo coverage: does "add three lines to any MMDet config" hold for mmdet's own zoo?

For one representative config of every 2D detection / instance segmentation folder of
mmdet's bundled zoo configs (``mmdet/.mim/configs``) this builds the detector with random
init (no pretrained weights, no downloads), predicts in FP on 2 synthetic images, then
quantizes it with the default policy (W4A4, first layer 8 bit, final layers FP), runs the
calibration (Reg-PTQ) with 2 iterations per unit on those 2 images, and predicts again.
Each config runs in its own process with a CPU-time limit. The logic lives in
:mod:`mmdet_regptq.zoo`; this script parses the options.

    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python tools/zoo_coverage.py \
        --out work_dirs/zoo_coverage            # table: work_dirs/zoo_coverage/coverage.md
    .venv/bin/python tools/zoo_coverage.py --list          # representatives only
    .venv/bin/python tools/zoo_coverage.py --one retinanet/retinanet_r50_fpn_1x_coco.py

Choices (see ``mmdet_regptq.zoo.configs.pick_representative``): ``*_tta.py`` files are
never picked; tracking, re-id and video folders are out; SyncBN becomes BN (one process); the input size is the
config's test pipeline size, capped (``--max-size``) for CPU time, and so is the number
of RPN proposals per image (``--max-proposals``, ``test_cfg.rpn.max_per_img``: the RoI
head on 1000 proposals dominated the two-stage models' time); images are the bundled
synthetic set (``data/synthetic``) through the config's own test pipeline, annotation
loading steps removed. The optional packages some configs import are the ``zoo`` extra
(``pip install -e .[zoo]``: scikit-image, mmpretrain, timm).
"""
from __future__ import annotations

import argparse

from mmdet_regptq.zoo import SweepOptions, representatives, run_sweep
from mmdet_regptq.zoo.probe import DEFAULT_MAX_TAIL_UNITS
from mmdet_regptq.zoo.probe import main as probe_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=SweepOptions.out)
    parser.add_argument('--max-size', type=int, default=320,
                        help='cap of the longer side of keep-ratio test resizes')
    parser.add_argument('--iters', type=int, default=2, help='calibration iterations per unit')
    parser.add_argument('--max-proposals', type=int, default=100,
                        help="cap of the RPN's test_cfg.rpn.max_per_img (0: the config's)")
    parser.add_argument('--timeout', type=int, default=900,
                        help='CPU seconds per config (RLIMIT_CPU of its process)')
    parser.add_argument('--wall-timeout', type=int, default=4 * 3600,
                        help='wall-clock seconds per config')
    parser.add_argument('--method', default=None, help='PTQ method (default: RegPTQ)')
    parser.add_argument('--max-tail-units', type=int, default=DEFAULT_MAX_TAIL_UNITS,
                        help="Reg-PTQ's depth bound schedule.max_tail_units: a unit with more "
                             'units after it runs no tail of its own (0: no bound)')
    parser.add_argument('--record', default=SweepOptions.record,
                        help='committed rows: seeds folders without a stored result and is '
                             'rewritten after each finished row ("" turns it off)')
    parser.add_argument('--only', default='', help='comma-separated folders')
    parser.add_argument('--rerun', action='store_true',
                        help='ignore results stored before this sweep started')
    parser.add_argument('--reverse', action='store_true',
                        help='last folder first (a second sweep process on the same --out '
                             'meets the first one in the middle; stored results are reused)')
    parser.add_argument('--list', action='store_true', help='print the representatives')
    parser.add_argument('--render-only', action='store_true',
                        help='write coverage.md from the stored results, run nothing')
    parser.add_argument('--one', default=None, help='run one config in this process')
    parser.add_argument('--result', default=None, help='with --one: write the row as JSON')
    args = parser.parse_args(argv)
    if args.list:
        for folder, cfg, why in representatives():
            print(f'{folder:22s} {cfg.name if cfg else "-":70s} {why}')
        return
    if args.one:
        one = ['--max-size', str(args.max_size), '--iters', str(args.iters),
               '--max-proposals', str(args.max_proposals),
               '--max-tail-units', str(args.max_tail_units)]
        probe_main([args.one, *one, *(['--result', args.result] if args.result else []),
                    *(['--method', args.method] if args.method else [])])
        return
    options = {k: v for k, v in vars(args).items() if k not in ('list', 'one', 'result')}
    run_sweep(SweepOptions(**options))


if __name__ == '__main__':
    main()
