"""CUDA latency of the detectors in PyTorch: FP32, FP16 and the fake-quant W8A8 / W4A4 models.

    python benchmarks/gpu.py [--models retinanet,fcos,frcnn,r50] [--size 512] [--runs 50]
        [--csv work_dirs/benchmark_gpu/gpu.csv]

What a user gets on a GPU before deploying: the calibrated model as PyTorch runs it (our
fake-quant modules, float math) against the float model in FP32 and FP16. Models as in
``benchmarks/deploy.py``: ``r50`` = RetinaNet R50-FPN from mmdet's zoo config (random init),
``retinanet`` / ``fcos`` / ``frcnn`` = the bundled detectors with their checkpoints. Each
row times the raw network (``model._forward``: for Faster R-CNN that is backbone, neck,
RPN with its NMS, and the RoI head on the proposals), batch 1, ``size x size``, median of
``--runs`` CUDA-synchronized runs after 5 warm-up runs, rows interleaved round by round.
Quantized rows are calibrated with MinMax on 2 random images (speed only).

Calibration time on a GPU is ``benchmarks/accuracy.py`` run on a CUDA machine: mmengine's
Runner puts the model on the GPU and the calibration follows it. Where mmcv's compiled ops
do not match the GPU machine's torch, ``benchmarks/mmcv_ext_torchvision.py`` stands in for
them (see its docstring). Prints a table and writes the CSV.
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
from typing import Any, Callable

import torch

from mmdet_regptq.bench.models import (BUNDLED, CHECKPOINTS, W4A4, W8A8, data_samples,
                                       model_config)
from mmdet_regptq.bench.timing import time_interleaved
from mmdet_regptq.table import Table


def variants(name: str, size: int, device: str) -> dict[str, Callable[[], Any]]:
    """Row name -> a no-argument call running that model once on the GPU."""
    from mmdet_regptq.deploy import build_detector, quantize_for_deploy

    cfg = model_config(name)
    checkpoint = CHECKPOINTS.get(name)
    checkpoint = str(checkpoint) if checkpoint and checkpoint.exists() else None
    fp32 = build_detector(cfg, checkpoint, device=device)
    x = torch.randn(1, 3, size, size, device=device)
    samples = data_samples(size)
    models = {'FP32': (fp32, x)}
    if device == 'cuda':  # mmcv's CPU NMS has no half kernel, and FP16 is a GPU format
        models['FP16'] = (copy.deepcopy(fp32).half(), x.half())
    for label, quant in (('W8A8 fake-quant', W8A8), ('W4A4 fake-quant', W4A4)):
        model = build_detector(cfg, checkpoint, device=device)
        quantize_for_deploy(model, quant=quant, method=dict(type='MinMax'),
                            input_shape=(size, size))
        models[label] = (model.eval(), x)

    def call(model: torch.nn.Module, inp: torch.Tensor) -> Callable[[], Any]:
        return lambda: model._forward(inp, samples)

    return {label: call(m, inp) for label, (m, inp) in models.items()}


def latency_rows(name: str, args: argparse.Namespace) -> list[dict]:
    runs = variants(name, args.size, args.device)
    sync = torch.cuda.synchronize if args.device == 'cuda' else None
    with torch.inference_mode():
        times = time_interleaved(runs, args.runs, warmup=5, sync=sync)
    base = statistics.median(times['FP32'])
    return [dict(model=name, variant=key, ms=round(statistics.median(ts) * 1e3, 2),
                 runs=len(ts), speedup_vs_fp32=round(base / statistics.median(ts), 2))
            for key, ts in times.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default='retinanet,fcos,frcnn,r50')
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--runs', type=int, default=50)
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'],
                        help='cpu only checks the script on a machine without a GPU')
    parser.add_argument('--csv', default='work_dirs/benchmark_gpu/gpu.csv')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('benchmarks/gpu.py --device cuda: no CUDA device '
                         '(torch.cuda.is_available() is False); run it on a GPU machine')
    import mmdet_regptq  # noqa: F401

    where = torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'
    print(f'device: {where}, torch {torch.__version__}')
    rows: list[dict] = []
    for name in args.models.split(','):
        if name not in BUNDLED and name != 'r50':
            raise SystemExit(f'--models {name!r}: allowed r50, {", ".join(BUNDLED)}')
        try:
            new = latency_rows(name, args)
        except Exception as err:  # one model's failure must not lose the others' rows
            logging.exception('%s failed', name)
            new = [dict(model=name, variant='error', ms='', runs=0,
                        speedup_vs_fp32=f'{type(err).__name__}: {err}'.splitlines()[0])]
        rows += new
        print('\n' + Table.from_rows(new, f'{name}: {where} latency, batch 1, '
                                         f'{args.size}x{args.size}').format())
    table = Table.from_rows(rows, f'latency (ms, median of {args.runs}; batch 1, '
                                  f'{args.size}x{args.size}; {where})')
    print('\n' + table.format())
    table.to_csv(args.csv)
    print(f'\nCSV: {args.csv}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
