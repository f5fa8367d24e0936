"""ONNX Runtime INT8 with its AVX2 kernels (x86 CPUs without VNNI), measured on a VNNI CPU.

Builds, per bundled detector, the raw-output graphs (``RawDetector``: the network up to
the head outputs, where every convolution is) of

- ``FP32``: the float model;
- ``INT8 uint8 w``: W8A8 with full 8-bit weight grids for ``target_cpu='avx2'``: weights
  stay ``uint8`` (ORT's exact but slower u8 x u8 kernel; what an AVX2-only CPU got before
  ``w_reduce_range``);
- ``INT8 w_reduce_range``: W8A8 with ``quant=dict(..., w_reduce_range=True)``: int8 weights
  within +-64 (ORT's u8 x s8 kernel, exact on AVX2);
- ``INT8 int8 w (VNNI only)``: the full 8-bit grids stored int8 (``target_cpu='vnni'``);
  saturates on AVX2, shown for the check only;

then runs each one in two subprocesses: natively (this CPU's VNNI kernels) and with
:mod:`mmdet_regptq.deploy.onnx.avx2_shim` preloaded (CPUID without AVX-512 / VNNI: ORT's
AVX2 kernels, run natively on this core), timing the rows interleaved, and compares the
outputs bit for bit. Needs Linux x86-64 with CPUID faulting and a C compiler.

``--qemu-cpu Haswell`` also runs the INT8 graphs once under ``qemu-x86_64 -cpu Haswell``
(an emulated AVX2 CPU, independent of the shim; outputs only, no timing) and compares them
with the native ones.

    python benchmarks/ort_avx2.py --models retinanet fcos --size 512 --runs 10 --threads 1 \
        [--qemu-cpu Haswell]

The AVX2 column is the latency of ORT's AVX2 code on THIS micro-architecture, not that of
another (AVX2-only) CPU; the speed-up INT8 / FP32 within that column is what carries over.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from mmdet_regptq.bench.models import BUNDLED, CHECKPOINTS, REPO_ROOT, W8A8

#: row -> (quant fields over W8A8, target_cpu); None = FP32
ROWS = {'FP32': None,
        'INT8 uint8 w': ({}, 'avx2'),
        'INT8 w_reduce_range': ({'w_reduce_range': True}, 'avx2'),
        'INT8 int8 w (VNNI only)': ({}, 'vnni')}


def build(name: str, size: int, work: Path) -> dict[str, str]:
    """Export the rows of detector ``name``; returns row -> ONNX path. Also saves the
    input (``input.npy``) and the fake-quant outputs of the reduce-range model."""
    import onnx
    import torch

    from mmdet_regptq.deploy import (RawDetector, build_detector, export_onnx, make_ort_int8,
                                     quantize_for_deploy, raw_output_names)

    cfg, ckpt = str(REPO_ROOT / BUNDLED[name]), str(CHECKPOINTS[name])
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    np.save(work / f'{name}_input.npy', x.numpy())
    paths = {}
    for row, spec in ROWS.items():
        model = build_detector(cfg, ckpt)
        names = raw_output_names(model, x)
        path = work / f'{name}_{row.split()[0]}_{len(paths)}.onnx'
        if spec is None:
            export_onnx(RawDetector(model), x, path, output_names=names, opset=17)
            paths[row] = str(path)
            continue
        extra, target = spec
        quantize_for_deploy(model, quant=dict(W8A8, **extra), method=dict(type='MinMax'),
                            input_shape=(size, size))
        export_onnx(RawDetector(model), x, path, output_names=names, int4_weights=False,
                    opset=17)
        fused, report = make_ort_int8(onnx.load(str(path)), [{'input': x.numpy()}],
                                      target_cpu=target)
        logging.info('%s %s: %s', name, row, report.summary())
        onnx.save(fused, str(path))
        paths[row] = str(path)
        if extra:
            with torch.no_grad():
                ref = RawDetector(model).eval()(x)   # eval: FCOS scales by stride
            np.savez(work / f'{name}_fake_quant.npz',
                     **{n: t.numpy() for n, t in zip(names, ref)})
    return paths


def measure(paths: dict[str, str], x_path: str, runs: int, threads: int, out: str) -> None:
    """In this process: outputs and interleaved latency of every row (``--child``)."""
    import onnxruntime as ort

    from mmdet_regptq.bench.timing import time_interleaved
    from mmdet_regptq.deploy.onnx.ort_int8 import u8s8_saturates
    from mmdet_regptq.deploy.onnx.session import ort_session_options

    x = np.load(x_path)
    sessions = {row: ort.InferenceSession(p, ort_session_options(threads),
                                          providers=['CPUExecutionProvider'])
                for row, p in paths.items()}
    outputs = {row: s.run(None, {'input': x}) for row, s in sessions.items()}
    times = time_interleaved({row: (lambda s=s: s.run(None, {'input': x}))
                              for row, s in sessions.items()}, runs)
    np.savez(out, **{f'{row}|{i}': o for row, outs in outputs.items()
                     for i, o in enumerate(outs)})
    print('CHILD ' + json.dumps({'saturates': u8s8_saturates(),
                                 'ms': {r: 1000 * float(np.median(t)) for r, t in times.items()}}))


#: the emulated child: numpy and onnxruntime only (importing torch under qemu takes minutes)
_QEMU_CHILD = """
import json, sys
import numpy as np
import onnxruntime as ort
from numpy._core._multiarray_umath import __cpu_features__
paths, x = json.loads(sys.argv[1]), np.load(sys.argv[2])
outs = {}
for row, path in paths.items():
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    outs.update({f'{row}|{i}': o for i, o in enumerate(session.run(None, {'input': x}))})
np.savez(sys.argv[3], **outs)
print('QEMU ' + json.dumps({'avx512_vnni': bool(__cpu_features__.get('AVX512VNNI'))}))
"""


def run_qemu(paths: dict[str, str], x_path: str, cpu: str, out: Path) -> None:
    """The INT8 rows once under ``qemu-x86_64 -cpu CPU``; outputs to ``out``."""
    qemu = shutil.which('qemu-x86_64')
    if qemu is None:
        raise SystemExit('--qemu-cpu: qemu-x86_64 is not installed (apt-get install qemu-user)')
    rows = {row: path for row, path in paths.items() if row != 'FP32'}
    done = subprocess.run([qemu, '-cpu', cpu, sys.executable, '-c', _QEMU_CHILD,
                           json.dumps(rows), x_path, str(out)], capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith('QEMU ')]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f'qemu child failed ({done.returncode}):\n{done.stderr[-3000:]}')
    if json.loads(lines[-1][len('QEMU '):])['avx512_vnni']:
        raise RuntimeError(f'qemu -cpu {cpu} reports AVX-512 VNNI; pick a CPU without it')


def run_child(paths: dict[str, str], x_path: str, args: argparse.Namespace, out: Path,
              env: dict | None) -> dict:
    cmd = [sys.executable, __file__, '--child', json.dumps(paths), x_path, str(out),
           '--runs', str(args.runs), '--threads', str(args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f'child failed ({done.returncode}):\n{done.stderr[-3000:]}')
    line = [ln for ln in done.stdout.splitlines() if ln.startswith('CHILD ')][-1]
    return json.loads(line[len('CHILD '):])


def _outputs(path: Path) -> dict[str, list[np.ndarray]]:
    data = np.load(path)
    rows: dict[str, list] = {}
    for key in sorted(data.files, key=lambda k: (k.split('|')[0], int(k.split('|')[1]))):
        rows.setdefault(key.split('|')[0], []).append(data[key])
    return rows


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(u.astype(np.float64) - v.astype(np.float64)).max())
               for u, v in zip(a, b))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['retinanet', 'fcos'],
                        choices=sorted(BUNDLED))
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--runs', type=int, default=10, help='timed runs per row')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--out', default=str(REPO_ROOT / 'work_dirs' / 'bench_ort_avx2'))
    parser.add_argument('--qemu-cpu', metavar='CPU',
                        help='also run the INT8 graphs under qemu-x86_64 -cpu CPU (e.g. '
                             'Haswell) and compare their outputs with the native ones')
    parser.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measure(json.loads(args.child[0]), args.child[1], args.runs, args.threads,
                args.child[2])
        return
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    from mmdet_regptq.deploy.onnx.avx2_shim import avx2_env, build_avx2_shim
    from mmdet_regptq.bench.cpu import cpu_name
    from mmdet_regptq.table import Table

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    lib = build_avx2_shim(work / 'shim')
    cpu = cpu_name()
    qemu_col = f'max |VNNI - qemu {args.qemu_cpu}|'
    table = Table(['model', 'graph', 'VNNI ms', 'AVX2 ms', 'AVX2 vs FP32 AVX2',
                   'max |VNNI - AVX2|', *([qemu_col] if args.qemu_cpu else []),
                   'max |AVX2 - fake-quant|'],
                  title=f'{cpu}, {args.threads} thread(s), {args.size}x{args.size}, '
                        f'raw-output graphs, median of {args.runs} interleaved runs', digits=None)
    for name in args.models:
        paths = build(name, args.size, work)
        x_path = str(work / f'{name}_input.npy')
        native = run_child(paths, x_path, args, work / f'{name}_vnni.npz', None)
        avx2 = run_child(paths, x_path, args, work / f'{name}_avx2.npz', avx2_env(lib))
        if native['saturates'] or not avx2['saturates']:
            raise RuntimeError('expected VNNI natively and AVX2 under the shim, got '
                               f"{native['saturates']=} {avx2['saturates']=}")
        out_native = _outputs(work / f'{name}_vnni.npz')
        out_avx2 = _outputs(work / f'{name}_avx2.npz')
        if args.qemu_cpu:
            run_qemu(paths, x_path, args.qemu_cpu, work / f'{name}_qemu.npz')
            out_qemu = _outputs(work / f'{name}_qemu.npz')
        ref = np.load(work / f'{name}_fake_quant.npz')
        ref = [ref[k] for k in ref.files]
        fp32_avx2 = avx2['ms']['FP32']
        for row in ROWS:
            table.add(**{'model': name, 'graph': row,
                         'VNNI ms': f"{native['ms'][row]:.1f}",
                         'AVX2 ms': f"{avx2['ms'][row]:.1f}",
                         'AVX2 vs FP32 AVX2': f"{fp32_avx2 / avx2['ms'][row]:.2f}x",
                         'max |VNNI - AVX2|': f'{_max_diff(out_native[row], out_avx2[row]):.3g}',
                         **({qemu_col: (f'{_max_diff(out_native[row], out_qemu[row]):.3g}'
                                        if row in out_qemu else '-')} if args.qemu_cpu else {}),
                         'max |AVX2 - fake-quant|': (
                             f'{_max_diff(out_avx2[row], ref):.3g}'
                             if row == 'INT8 w_reduce_range' else '-')})
        print(table.format(), flush=True)
    print(table.to_markdown())


if __name__ == '__main__':
    main()
