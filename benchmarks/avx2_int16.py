"""The AVX2 convolution kernel of ``tvm_int4`` with and without int16 sums, one layer at a
time: every step's ``vpmaddubsw`` pair sums widened by ``vpmaddwd`` at once, against up to
``G`` steps added in int16 first (``tvm/avx2.py``). Each layer is built twice for
``mcpu='haswell'``, checked against an int64 reference, and timed interleaved.

    python benchmarks/avx2_int16.py [--runs 60]

Prints per layer shape: milliseconds (median of ``--runs``) both ways and their ratio, with
the CPU's model name and whether it has AVX-512 VNNI (the code is AVX2 either way).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mmdet_regptq.bench.cpu import cpu_name

#: (input channels, output channels, kernel, stride, height = width, max |w|)
LAYERS = [(64, 64, 3, 1, 128, 8), (64, 54, 3, 1, 128, 8), (64, 64, 3, 2, 64, 15),
          (16, 16, 3, 1, 128, 8), (64, 64, 1, 1, 32, 8), (256, 64, 1, 1, 32, 8)]


def _runner(c: int, k: int, size: int, kernel: int, stride: int, peak: int | None) -> object:
    import tvm
    from tvm import relax

    from mmdet_regptq.deploy.tvm.schedule import cpu_pipeline
    from mmdet_regptq.deploy.tvm.vnni import emit_conv_vnni

    target = tvm.target.Target({'kind': 'llvm', 'mcpu': 'haswell'})
    bb = relax.BlockBuilder()
    x = relax.Var('x', relax.TensorType((1, c, size, size), 'int8'))
    w = relax.Var('w', relax.TensorType((k, c, kernel, kernel), 'int8'))
    pad = kernel // 2
    with bb.function('main', [x, w]):
        with bb.dataflow():
            y = bb.emit(emit_conv_vnni(bb, x, w, stride, [pad] * 4, 1, 1, isa='avx2',
                                       max_weight=peak))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    executable = tvm.compile(bb.get(), target=target, relax_pipeline=cpu_pipeline(target))
    return relax.VirtualMachine(executable, tvm.cpu())['main']


def main() -> None:
    import tvm

    from mmdet_regptq.deploy.tvm.avx2 import int16_group

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=60)
    args = parser.parse_args()
    print(f'CPU: {cpu_name()}; 1 thread; AVX2 code (mcpu=haswell)')
    rng = np.random.default_rng(0)
    print(f'{"layer":<34} {"widen each step":>16} {"int16 sums":>12} {"ratio":>6}')
    for c, k, kernel, stride, size, peak in LAYERS:
        x = rng.integers(-128, 128, (1, c, size, size)).astype(np.int8)
        w = rng.integers(-peak, peak + 1, (k, c, kernel, kernel)).astype(np.int8)
        ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                         stride=stride, padding=kernel // 2).numpy()
        feed = [tvm.runtime.tensor(x), tvm.runtime.tensor(w)]
        runs = {name: _runner(c, k, size, kernel, stride, p)
                for name, p in (('widen', None), ('int16', peak))}
        for name, run in runs.items():
            if not np.array_equal(run(*feed).numpy().astype(np.int64), ref.astype(np.int64)):
                raise SystemExit(f'{name}: not equal to the int64 reference')
        times = {name: [] for name in runs}
        for _ in range(args.runs):
            for name, run in runs.items():
                tic = time.perf_counter()
                run(*feed)
                times[name].append(time.perf_counter() - tic)
        ms = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
        layer = (f'{c}->{k} {kernel}x{kernel}/{stride} {size}^2 |w|<={peak} '
                 f'G={int16_group(c, kernel, kernel, peak)}')
        print(f'{layer:<34} {ms["widen"]:>13.2f} ms {ms["int16"]:>9.2f} ms '
              f'{ms["widen"] / ms["int16"]:>5.2f}x')


if __name__ == '__main__':
    main()
