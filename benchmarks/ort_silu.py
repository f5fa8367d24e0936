"""ONNX Runtime latency of ONNX graphs with their SiLUs as ``Sigmoid → Mul`` and as ``QuickGelu``.

    python benchmarks/ort_silu.py FP32.onnx INT8.onnx [...] [--inputs INPUTS.npz]
        [--runs 20] [--threads 1]

Each graph runs in two versions, side by side (interleaved, on the ``--inputs`` array
named as the graph input, e.g. a deployed artifact's ``reference_end2end.npz``, else
random values in [0, 1); the runtime's session options, ``ORT_ENABLE_ALL``): every SiLU as
``Sigmoid → Mul`` (:func:`~mmdet_regptq.deploy.onnx.silu.expand_silu`) and as one
``QuickGelu`` (:func:`~mmdet_regptq.deploy.onnx.silu.fuse_silu`, as ``make_ort_int8``
writes it), so the input may be either. ORT fuses ``x * sigmoid(x)`` itself in float
graphs, so there the two rows should match; in a Q/DQ graph it does not. Also prints the
largest output difference of the two versions and each row's speed-up over the first
graph's ``Sigmoid → Mul`` version.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('onnx', nargs='+', help='ONNX files (the first is the baseline)')
    parser.add_argument('--inputs', help='.npz with an array named as the graph input')
    parser.add_argument('--runs', type=int, default=20, help='timed runs per row')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    from mmdet_regptq.bench.cpu import cpu_name
    from mmdet_regptq.bench.timing import time_interleaved
    from mmdet_regptq.deploy.onnx.session import ort_session_options
    from mmdet_regptq.deploy.onnx.silu import expand_silu, fuse_silu
    from mmdet_regptq.table import Table

    runs, outputs, fused = {}, {}, {}
    for path in args.onnx:
        plain = onnx.load(path)
        expand_silu(plain)
        joined = onnx.ModelProto()
        joined.CopyFrom(plain)
        fused[path] = fuse_silu(joined)
        spec = plain.graph.input[0]
        shape = [d.dim_value for d in spec.type.tensor_type.shape.dim]
        feed = {spec.name: np.load(args.inputs)[spec.name] if args.inputs else
                np.random.default_rng(0).random(shape, np.float32)}
        for silu, proto in (('Sigmoid + Mul', plain), ('QuickGelu', joined)):
            session = ort.InferenceSession(proto.SerializeToString(),
                                           ort_session_options(args.threads),
                                           providers=['CPUExecutionProvider'])
            runs[path, silu] = lambda s=session, f=feed: s.run(None, f)
            outputs[path, silu] = runs[path, silu]()
    times = time_interleaved(runs, args.runs)
    base = statistics.median(times[args.onnx[0], 'Sigmoid + Mul'])
    rows = []
    for (path, silu), ts in times.items():
        med = statistics.median(ts)
        diff = max(float(np.abs(a.astype(np.float64) - b).max(initial=0))
                   for a, b in zip(outputs[path, 'Sigmoid + Mul'], outputs[path, silu]))
        rows.append({'graph': path, 'SiLU': silu, 'SiLUs': fused[path], 'ms': round(med * 1e3, 1),
                     'speed-up': round(base / med, 2), 'max abs diff vs Sigmoid + Mul': diff})
    print(Table.from_rows(rows, title=f'{cpu_name()}, {args.threads} thread(s), {args.runs} '
                                      'interleaved runs').to_markdown())
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
