"""Where does quantization hurt a detector? Five analysis commands with plots and tables.

    python tools/analyze.py noise CONFIG CKPT [--num-images 50] [--parts cls reg neck]
    python tools/analyze.py weights CONFIG CKPT [--bits 4]
    python tools/analyze.py scales CONFIG CKPT --layer bbox_head.reg_convs.0.conv [--num-images 50]
    python tools/analyze.py sensitivity CONFIG CKPT --bits 4 [--num-images 50]
    python tools/analyze.py compare CONFIG FP_CKPT QUANTIZED_CKPT [--images a.jpg b.jpg]

Plots (PNG) and tables (CSV) go to ``--out-dir`` (default
``work_dirs/analysis/<config name>/<command>``); tables are also printed. ``--num-images N``
evaluates COCO AP (mmdet's CocoMetric) on the first N test images; without it the commands
compare with the FP model on ``--proxy-images`` images (global-loss proxies only).
CKPT ``none`` keeps the random initialisation (smoke tests only).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmdet_regptq.analysis import (CompareConfig, DetectorBench, NoiseConfig,
                                   ProxyConfig, ScalesConfig, SensitivityConfig, WeightsConfig,
                                   load_detector, load_quantized_detector, run_compare,
                                   run_noise, run_scales, run_sensitivity, run_weights)
from mmdet_regptq.analysis.scales import default_factors
from mmdet_regptq.safe_load import checkpoint_problem

logger = logging.getLogger('analyze')


def _common(p: argparse.ArgumentParser, *, images: bool = True) -> None:
    p.add_argument('config')
    p.add_argument('checkpoint', help="float checkpoint ('none': random init, smoke tests)")
    p.add_argument('--out-dir', help='default: work_dirs/analysis/<config>/<command>')
    p.add_argument('--device', default='cpu')
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE')
    if images:
        p.add_argument('--num-images', type=int,
                       help='evaluate COCO AP on the first N test images (else proxies only)')
        p.add_argument('--proxy-images', type=int, default=16,
                       help='images for the proxies when --num-images is not given')
        p.add_argument('--batch-size', type=int, default=4)
        p.add_argument('--score-thr', type=float, default=0.3,
                       help='FP score above which predictions/detections are compared')


def _parts(p: argparse.ArgumentParser, default: list[str]) -> None:
    p.add_argument('--parts', nargs='+', default=default,
                   choices=['cls', 'reg', 'shared', 'backbone', 'neck'])
    p.add_argument('--no-final', action='store_true',
                   help='leave out the final prediction layers (retina_cls, fc_reg, ...)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('noise', help='Observation 1: cls vs reg branch under weight noise')
    _common(p)
    _parts(p, ['cls', 'reg'])
    p.add_argument('--levels', type=float, nargs='+', default=list(NoiseConfig.levels),
                   help='noise std relative to each channel weight std')
    p.add_argument('--kinds', nargs='+', default=list(NoiseConfig.kinds))
    p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)

    p = sub.add_parser('weights', help='Observation 3: weight histograms, kurtosis, clipping')
    _common(p, images=False)
    _parts(p, ['cls', 'reg'])
    p.add_argument('--bits', type=int, default=4)

    p = sub.add_parser('scales', help='Observation 2: local MSE vs global loss over a scale sweep')
    _common(p)
    p.add_argument('--layer', required=True, help='fully-qualified Conv2d/Linear name')
    p.add_argument('--bits', type=int, default=4)
    p.add_argument('--factors', type=float, nargs='+', default=list(default_factors()))
    p.add_argument('--scale-method', default='mse', help='initial (min-error) scale search')

    p = sub.add_parser('sensitivity', help='quantize one layer at a time; suggest overrides')
    _common(p)
    p.add_argument('--bits', type=int, default=4)
    p.add_argument('--a-bits', type=int, help="also quantize the layer's input")
    p.add_argument('--quantize-final', action='store_true')
    p.add_argument('--layers', help='regex of the layers to test (default: all quantized)')
    p.add_argument('--suggest-bits', type=int, default=8)
    p.add_argument('--top-k', type=int, default=3)
    p.add_argument('--min-drop', type=float, default=0.0)

    p = sub.add_parser('compare', help='FP vs quantized detections side by side')
    p.add_argument('config')
    p.add_argument('checkpoint', help='float checkpoint')
    p.add_argument('quantized', help='quantized checkpoint (quantized.pth of the hook)')
    p.add_argument('--images', nargs='+', help='image files (default: first test images)')
    p.add_argument('--num-images', type=int, default=6, help='test images when no --images')
    p.add_argument('--score-thr', type=float, default=0.3)
    p.add_argument('--out-dir')
    p.add_argument('--device', default='cpu')
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE')
    return parser


def _cfg_options(pairs: list[str]) -> dict:
    from mmengine.config import DictAction
    ns = argparse.Namespace()
    DictAction(option_strings=[], dest='o')(None, ns, pairs)
    return ns.o


def _bench(args, cfg, model) -> DetectorBench:
    with_ap = args.num_images is not None
    return DetectorBench.from_val_set(cfg, model, num_images=args.num_images or args.proxy_images,
                                      batch_size=args.batch_size, with_ap=with_ap)


def _report(table, files, lines=()) -> None:
    print(table.format())
    for line in lines:
        print(line)
    for f in files:
        print(f'wrote {f}')


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    ckpt = None if args.checkpoint.lower() == 'none' else args.checkpoint
    for path in (ckpt, getattr(args, 'quantized', None)):
        problem = checkpoint_problem(path)   # corrupt / unsafe: one line, no traceback
        if problem:
            print(f'analyze.py: error: {problem}', file=sys.stderr)
            return 2
    cfg, model = load_detector(args.config, ckpt, device=args.device,
                               cfg_options=_cfg_options(args.cfg_options))
    out_dir = Path(args.out_dir or
                   Path('work_dirs/analysis') / Path(args.config).stem / args.command)
    if args.command == 'weights':
        res = run_weights(model, WeightsConfig(bits=args.bits, parts=tuple(args.parts),
                                               include_final=not args.no_final), out_dir)
        _report(res.table, res.files, res.notes)
        return 0
    if args.command == 'compare':
        return _compare(args, cfg, model, out_dir)
    bench = _bench(args, cfg, model)
    proxy = ProxyConfig(score_thr=args.score_thr)
    with_ap = args.num_images is not None
    if args.command == 'noise':
        res = run_noise(bench, NoiseConfig(
            levels=tuple(args.levels), kinds=tuple(args.kinds), parts=tuple(args.parts),
            repeats=args.repeats, seed=args.seed, with_ap=with_ap,
            include_final=not args.no_final, proxy=proxy), out_dir)
        _report(res.table, res.files, res.verdict)
    elif args.command == 'scales':
        res = run_scales(bench, ScalesConfig(
            layer=args.layer, bits=args.bits, factors=tuple(args.factors), with_ap=with_ap,
            proxy=proxy, quantizer=dict(type='Uniform', per_channel=True, symmetric=False,
                                        scale_method=args.scale_method)), out_dir)
        _report(res.table, res.files, [f'best factor by {k}: x{v:g}' for k, v in res.best.items()])
    elif args.command == 'sensitivity':
        res = run_sensitivity(bench, SensitivityConfig(
            bits=args.bits, a_bits=args.a_bits, with_ap=with_ap, proxy=proxy,
            quant=dict(quantize_final=args.quantize_final), layers=args.layers,
            suggest_bits=args.suggest_bits,
            top_k=args.top_k, min_drop=args.min_drop), out_dir)
        _report(res.table, res.files, ['suggested overrides (RegPTQHook):', '  ' + res.suggestion])
    return 0


def _compare(args, cfg, model, out_dir: Path) -> int:
    if args.images:
        bench = DetectorBench.from_files(cfg, model, args.images)
    else:
        bench = DetectorBench.from_val_set(cfg, model, num_images=args.num_images, with_ap=False)
    qmodel, meta = load_quantized_detector(bench, args.quantized)
    quant = meta['quant']
    label = f'W{quant.get("w_bits", "?")}A{quant.get("a_bits", "?")} {meta["method"]}'
    res = run_compare(bench, bench.with_model(qmodel),
                      CompareConfig(score_thr=args.score_thr, label=label), out_dir)
    _report(res.table, res.files)
    return 0


if __name__ == '__main__':
    sys.exit(main())
