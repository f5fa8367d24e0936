"""Latency of compiled ``tvm_int4`` / ``tvm_relax`` artifacts, side by side.

    python benchmarks/tvm_artifacts.py DIR [DIR ...] [--runs 30] [--labels a b ...]

Each ``DIR`` is an artifact directory (``model.so`` + ``weights.npz`` + ``meta.json``, e.g.
``work_dir/end2end_tvm_int4`` of ``tools/deploy.py``). All must have the same input shape.
The artifacts run round-robin on one random input (interleaving spreads the noise of a shared
CPU over every row) and the table gives the median, the ratio to the first row, and what
the artifact's ``meta.json`` says about its layers (integer layers, LLAQ shift layers,
kernels). Use it to price a change of the quantized model, e.g. QDrop vs Reg-PTQ with
power-of-two LLAQ, both W4A4.
"""
from __future__ import annotations

import argparse
import statistics
from collections import Counter

import numpy as np

from mmdet_regptq.bench.timing import time_interleaved
from mmdet_regptq.table import Table


def describe(meta: dict) -> str:
    """``38 int8, 10 int8 shift; vnni_int8 x 49``-style summary of an artifact's layers."""
    layers = Counter(w for _, w in (meta.get('layers') or {}).values())
    kernels = Counter((meta.get('kernels') or {}).values())
    return ('; '.join([', '.join(f'{n} {k}' for k, n in sorted(layers.items())),
                       ', '.join(f'{k} x {n}' for k, n in sorted(kernels.items()))])
            or 'float')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('artifacts', nargs='+', help='artifact directories')
    parser.add_argument('--labels', nargs='+', help='one per artifact (default: the paths)')
    parser.add_argument('--runs', type=int, default=30, help='timed runs per artifact')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    labels = args.labels or args.artifacts
    if len(labels) != len(args.artifacts):
        parser.error(f'--labels: {len(labels)} given for {len(args.artifacts)} artifacts')
    from mmdet_regptq.deploy.tvm.runner import TvmRunner

    runners = {label: TvmRunner(path) for label, path in zip(labels, args.artifacts)}
    shapes = {label: tuple(next(iter(r.meta['inputs'].values()))) for label, r in runners.items()}
    if len(set(shapes.values())) != 1:
        parser.error(f'artifacts: the input shapes differ: {shapes}')
    feed = np.random.default_rng(args.seed).standard_normal(
        next(iter(shapes.values()))).astype(np.float32)
    calls = {label: (lambda r=r: r({r.input_names[0]: feed})) for label, r in runners.items()}
    times = time_interleaved(calls, args.runs)
    first = statistics.median(times[labels[0]])
    table = Table(['artifact', 'median ms', 'vs first', 'layers; kernels'],
                  title=f'input {list(next(iter(shapes.values())))}, {args.runs} runs each, '
                        'interleaved', digits=None)
    for label in labels:
        median = statistics.median(times[label])
        table.add(**{'artifact': label, 'median ms': f'{1000 * median:.1f}',
                     'vs first': f'{median / first:.2f}',
                     'layers; kernels': describe(runners[label].meta)})
    print('\n' + table.to_markdown())
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
