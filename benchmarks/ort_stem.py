"""ONNX Runtime latency of one quantized image stem, as exported and on ``SpaceToDepth`` codes.

    python benchmarks/ort_stem.py [--size 512] [--kernel 7] [--pad 3] [--out-channels 16]
        [--runs 60] [--threads 1]

Builds the stem as our export writes it (``Q → DQ → Conv(stride 2) → Relu → Q``, int8
per-channel weights, 3 input channels), then the same graph after
:func:`~mmdet_regptq.deploy.onnx.stem.space_to_depth_stems`; ORT fuses both into one
``QLinearConv``. Times them side by side (interleaved, median) and checks that the output
codes are identical. Preload the AVX2 CPUID shim (``python -m
mmdet_regptq.deploy.onnx.avx2_shim DIR``) to see ORT's AVX2 kernels on a VNNI CPU.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def stem_graph(size: int, kernel: int, pad: int, out_channels: int) -> onnx.ModelProto:
    """A quantized 3-channel stride-2 stem with random int8 weights (``|w| <= 64``)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(1 / 64, np.float32), 'xs'),
             numpy_helper.from_array(np.array(110, np.uint8), 'xz'),
             numpy_helper.from_array(np.array(0.05, np.float32), 'ys'),
             numpy_helper.from_array(np.array(0, np.uint8), 'yz'),
             numpy_helper.from_array(
                 rng.integers(-64, 65, (out_channels, 3, kernel, kernel)).astype(np.int8), 'wq'),
             numpy_helper.from_array(np.zeros(out_channels, np.int8), 'wz'),
             numpy_helper.from_array(
                 (rng.random(out_channels) * 0.01 + 0.001).astype(np.float32), 'ws'),
             numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), 'b')]
    nodes = [helper.make_node('QuantizeLinear', ['x', 'xs', 'xz'], ['xq']),
             helper.make_node('DequantizeLinear', ['xq', 'xs', 'xz'], ['xd']),
             helper.make_node('DequantizeLinear', ['wq', 'ws', 'wz'], ['w'], axis=0),
             helper.make_node('Conv', ['xd', 'w', 'b'], ['c'], name='stem',
                              kernel_shape=[kernel, kernel], strides=[2, 2], pads=[pad] * 4),
             helper.make_node('Relu', ['c'], ['r']),
             helper.make_node('QuantizeLinear', ['r', 'ys', 'yz'], ['y'])]
    graph = helper.make_graph(
        nodes, 'stem', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info('y', TensorProto.UINT8, ['n', 'c', 'h', 'w'])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--kernel', type=int, default=7)
    parser.add_argument('--pad', type=int, default=3)
    parser.add_argument('--out-channels', type=int, default=16)
    parser.add_argument('--runs', type=int, default=60)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    from mmdet_regptq.bench.cpu import cpu_name
    from mmdet_regptq.bench.timing import time_interleaved
    from mmdet_regptq.deploy.onnx.session import ort_session_options
    from mmdet_regptq.deploy.onnx.stem import space_to_depth_stems

    exported = stem_graph(args.size, args.kernel, args.pad, args.out_channels)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(exported)
    if not space_to_depth_stems(rewritten):
        raise SystemExit(f'--kernel {args.kernel} --pad {args.pad} at --size {args.size}: '
                         'not expressible on SpaceToDepth codes (trailing input unread)')
    x = np.random.default_rng(1).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    runs, codes = {}, {}
    for name, model in (('QLinearConv, stride 2', exported),
                        ('SpaceToDepth + QLinearConv, stride 1', rewritten)):
        session = ort.InferenceSession(model.SerializeToString(),
                                       ort_session_options(args.threads),
                                       providers=['CPUExecutionProvider'])
        runs[name] = lambda s=session: s.run(None, {'x': x})
        codes[name] = runs[name]()[0]
    first, second = codes.values()
    if not np.array_equal(first, second):
        raise SystemExit('the rewritten stem gave other codes')
    times = time_interleaved(runs, args.runs)
    base = statistics.median(next(iter(times.values())))
    print(f'{cpu_name()}; {args.threads} thread(s); stem 3 -> {args.out_channels}, '
          f'{args.kernel}x{args.kernel} stride 2 at {args.size}x{args.size}; median of '
          f'{args.runs} interleaved runs; codes identical')
    for name, samples in times.items():
        ms = statistics.median(samples) * 1e3
        print(f'{name:40s} {ms:7.2f} ms  {base / statistics.median(samples):.2f}x')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
