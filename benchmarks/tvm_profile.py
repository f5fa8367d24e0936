"""Where the time of a TVM artifact goes: per compiled kernel (PrimFunc) and per kind.

    python benchmarks/tvm_profile.py ARTIFACT_DIR [ARTIFACT_DIR ...] [--inputs INPUTS.npz]
        [--runs 5] [--top 25] [--threads 1] [--csv OUT.csv] [--ort FILE.onnx ...]

Loads each artifact as :class:`~mmdet_regptq.deploy.tvm.runner.TvmRunner` does and times
every ``Call`` instruction of the Relax VM's ``main`` through the VM's instrumentation hook
(``VirtualMachine.set_instrument``): a ``perf_counter`` before and after each call, summed
over ``--runs`` runs after one warm-up. The hook adds a few microseconds per call; the table
also prints the un-instrumented time of ``main`` (median of ``--runs``) to compare with the
per-call sum. Kernels are grouped into kinds from their names (``vnni_conv`` / ``avx2_conv``
= our integer kernels, ``conv (generic)`` = TVM's ``conv2d`` on the fixed schedule,
``rescale+SiLU`` = a conv's float epilogue, int32 accumulator → scale, bias, SiLU
(``x * sigmoid(x)``, ``expf``), then quantize (and a concat, when fused with one),
``elementwise`` = other fused casts / adds / quantize chains, ``concat``,
``resize``, ``pool``, ``layout``, ``vm builtin`` = allocation and tuple bookkeeping).
Before profiling, every artifact's plain ``main`` and every ``--ort`` graph (ONNX Runtime,
``--threads`` intra-op threads, e.g. the FP32 ``end2end.onnx`` as the reference) are timed
interleaved, ``--runs`` runs each, and the medians printed with their ratio to the first
``--ort`` graph. Input: the ``--inputs`` array named as the artifact's input (e.g. a deployed
``reference_outputs.npz``'s ``input``), else random values in [0, 1).
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmdet_regptq.bench.cpu import cpu_name

#: (kind, regex on the kernel name), first match wins
KINDS = (
    ('vnni_conv', r'vnni'),
    ('avx2_conv', r'avx2'),
    ('conv (generic)', r'conv2d'),
    ('matmul', r'matmul|dense'),
    ('rescale+SiLU', r'sigmoid'),
    ('concat', r'concat'),
    ('resize', r'resize|upsampl'),
    ('pool', r'pool'),
    ('layout', r'layout_transform|transpose|reshape$'),
    ('vm builtin', r'^vm\.|^relax\.|builtin'),
)


def kind_of(name: str) -> str:
    """The kind of a kernel from its symbol name (:data:`KINDS`; else ``elementwise``)."""
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return 'elementwise'


def _shapes(args: tuple) -> str:
    out = []
    for a in args:
        shape = getattr(a, 'shape', None)
        if shape is not None:
            out.append('x'.join(str(int(d)) for d in shape))
    return ' '.join(out[:3])


def _main_call(runner: Any, inputs: dict[str, np.ndarray]) -> tuple[Any, list]:
    import tvm

    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[n], np.float32), runner.device)
            for n in runner.input_names]
    return runner.vm['main'], args


def latency(artifacts: list[str], ort_files: list[str], inputs: dict[str, np.ndarray],
            runs: int, threads: int) -> dict[str, float]:
    """Median ms of each artifact's ``main`` and each ONNX Runtime graph, interleaved."""
    import onnxruntime as ort
    from mmdet_regptq.bench.timing import time_interleaved
    from mmdet_regptq.deploy.tvm.runner import TvmRunner

    rows: dict[str, Callable[[], Any]] = {}
    for path in ort_files:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        feed = {i.name: np.ascontiguousarray(inputs[i.name], np.float32)
                for i in sess.get_inputs()}
        rows[f'ort {path}'] = lambda s=sess, f=feed: s.run(None, f)
    for path in artifacts:
        runner = TvmRunner(path)
        main, args = _main_call(runner, inputs)
        weights = runner.weights
        rows[f'tvm {path}'] = lambda m=main, a=args, w=weights: m(*a, *w)
    times = time_interleaved(rows, runs, warmup=1)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def profile(artifact: str | Path, inputs: dict[str, np.ndarray], runs: int) -> dict:
    """Per-call times of one artifact's ``main``: ``{'calls': {name: [total_s, count,
    shapes]}, 'main_ms': median un-instrumented ms, 'instrumented_ms': per-run sum}``."""
    from mmdet_regptq.deploy.tvm.runner import TvmRunner

    runner = TvmRunner(artifact)
    main, args = _main_call(runner, inputs)
    main(*args, *runner.weights)                      # warm-up
    plain = []
    for _ in range(runs):
        start = time.perf_counter()
        main(*args, *runner.weights)
        plain.append(time.perf_counter() - start)
    calls: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, ''])
    stack: list[float] = []

    def instrument(func, name, before, ret, *call_args):  # noqa: ANN001 (TVM callback)
        if before:
            stack.append(time.perf_counter())
        else:
            entry = calls[str(name)]
            entry[0] += time.perf_counter() - stack.pop()
            entry[1] += 1
            if not entry[2]:
                entry[2] = _shapes(call_args)
        return 0                                       # VMInstrumentReturnKind.kNoOp

    runner.vm.set_instrument(instrument)
    start = time.perf_counter()
    for _ in range(runs):
        main(*args, *runner.weights)
    total = (time.perf_counter() - start) / runs
    return dict(calls={k: [v[0] / runs, v[1] // runs, v[2]] for k, v in calls.items()},
                main_ms=1e3 * statistics.median(plain), instrumented_ms=1e3 * total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('artifacts', nargs='+', help='TVM artifact directories')
    parser.add_argument('--inputs', help='.npz with an array named as the artifact input')
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--top', type=int, default=25, help='kernels listed per artifact')
    parser.add_argument('--threads', type=int, default=1, help='TVM_NUM_THREADS')
    parser.add_argument('--csv', help='write every kernel row here')
    parser.add_argument('--ort', nargs='*', default=[],
                        help='ONNX graphs timed with ONNX Runtime beside the artifacts')
    parser.add_argument('--latency-only', action='store_true', help='skip the profiles')
    args = parser.parse_args(argv)
    if args.runs < 1:
        raise ValueError(f'--runs={args.runs}: must be >= 1')
    os.environ['TVM_NUM_THREADS'] = str(args.threads)
    print(f'CPU: {cpu_name()}; threads {args.threads}; load {os.getloadavg()[0]:.2f}')
    meta = json.loads((Path(args.artifacts[0]) / 'meta.json').read_text())
    if args.inputs:
        stored = np.load(args.inputs)
        inputs = {n: stored[n] for n in meta['inputs']}
    else:
        rng = np.random.default_rng(0)
        inputs = {n: rng.random(s, dtype=np.float32) for n, s in meta['inputs'].items()}
    medians = latency(args.artifacts, args.ort, inputs, args.runs, args.threads)
    base = next(iter(medians.values()))
    print(f'\nlatency, interleaved, median of {args.runs} (ratio: first row / row); '
          f'load {os.getloadavg()[0]:.2f}')
    for name, ms in medians.items():
        print(f'{name:<80} {ms:8.1f} ms {base / ms:6.2f}x')
    rows = []
    for artifact in ([] if args.latency_only else args.artifacts):
        result = profile(artifact, inputs, args.runs)
        calls = result['calls']
        summed = 1e3 * sum(v[0] for v in calls.values())
        print(f'\n{artifact}: main {result["main_ms"]:.1f} ms (median of {args.runs}); '
              f'instrumented {result["instrumented_ms"]:.1f} ms, kernels sum {summed:.1f} ms')
        by_kind: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
        for name, (sec, count, _) in calls.items():
            by_kind[kind_of(name)][0] += sec
            by_kind[kind_of(name)][1] += count
        print(f'{"kind":<16} {"ms":>8} {"%":>6} {"calls":>6}')
        for kind, (sec, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
            print(f'{kind:<16} {1e3 * sec:8.2f} {100 * 1e3 * sec / summed:6.1f} {count:6d}')
        print(f'\n{"kernel":<60} {"kind":<14} {"ms":>7} {"calls":>5}  shapes')
        ranked = sorted(calls.items(), key=lambda kv: -kv[1][0])
        for name, (sec, count, shapes) in ranked[:args.top]:
            print(f'{name[:60]:<60} {kind_of(name):<14} {1e3 * sec:7.2f} {count:5d}  {shapes}')
        rows += [dict(artifact=artifact, kernel=n, kind=kind_of(n), ms=round(1e3 * v[0], 3),
                      calls=v[1], shapes=v[2]) for n, v in ranked]
    if args.csv and rows:
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
