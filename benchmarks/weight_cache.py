"""Inference time of a fake-quant detector with and without the cached quantized weights.

    python benchmarks/weight_cache.py [--model retinanet] [--size 512] [--runs 10]
        [--device cpu]

Evaluation (no autograd) caches each layer's fake-quantized weight
(``QuantModule.cache_weights``). This times ``model._forward`` of a W4A4 model (MinMax on
random images; speed only) with the cache on and off, interleaved run by run in one
process, and checks that both give the same outputs bit for bit.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmdet_regptq.bench.models import BUNDLED, CHECKPOINTS, W4A4, data_samples, model_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='retinanet', choices=['r50', *BUNDLED])
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    args = parser.parse_args(argv)
    import mmdet_regptq  # noqa: F401
    from mmdet_regptq.deploy import build_detector, quantize_for_deploy
    from mmdet_regptq.quant.modules import QuantModule

    checkpoint = CHECKPOINTS.get(args.model)
    model = build_detector(model_config(args.model),
                           str(checkpoint) if checkpoint and checkpoint.exists() else None,
                           device=args.device)
    quantize_for_deploy(model, quant=W4A4, method=dict(type='MinMax'),
                        input_shape=(args.size, args.size))
    x = torch.randn(1, 3, args.size, args.size, device=args.device)
    samples = data_samples(args.size)
    sync = torch.cuda.synchronize if args.device == 'cuda' else (lambda: None)
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    with torch.no_grad():
        for _ in range(args.runs + 2):                 # the first two rounds warm up
            for cached in (True, False):
                QuantModule.cache_weights = cached
                sync()
                start = time.perf_counter()
                outputs[cached] = model._forward(x, samples)
                sync()
                times[cached].append(time.perf_counter() - start)
    QuantModule.cache_weights = True
    flat = [[t for level in outputs[c] for t in (level if isinstance(level, (list, tuple))
                                                 else [level])] for c in (True, False)]
    same = all(torch.equal(a, b) for a, b in zip(*flat))
    on, off = (statistics.median(times[c][2:]) * 1e3 for c in (True, False))
    print(f'{args.model} W4A4 fake-quant, 1x3x{args.size}x{args.size}, {args.device}, '
          f'median of {args.runs}: cached weights {on:.1f} ms, re-quantized every forward '
          f'{off:.1f} ms ({off / on:.2f}x); outputs identical: {same}')
    return 0 if same else 1


if __name__ == '__main__':
    raise SystemExit(main())
