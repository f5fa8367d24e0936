"""The AVX-512 VNNI int8 convolution of the TVM backend: bit-exact against an int64
reference for the shapes a detector has (odd channel counts, K not a multiple of 16,
stride 2, dilation, asymmetric padding), over the whole int8 range."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmdet_regptq.deploy.tvm.build import host_target
from mmdet_regptq.deploy.tvm.vnni import has_vnni

SHAPES = [
    # N, C, K, H, W, kernel, stride, dilation, pads (top, left, bottom, right), groups
    (1, 64, 64, 16, 16, 3, 1, 1, (1, 1, 1, 1), 1),
    (2, 3, 40, 17, 13, 3, 2, 1, (1, 1, 1, 1), 1),
    (1, 20, 24, 9, 11, 1, 1, 1, (0, 0, 0, 0), 1),
    (1, 16, 18, 12, 12, 3, 1, 2, (2, 2, 2, 2), 1),
    (2, 8, 16, 10, 10, 3, 2, 1, (0, 1, 1, 0), 1),
    (1, 16, 8, 7, 7, 3, 1, 1, (1, 1, 1, 1), 4),
    # output rows of 16k columns at row stride 1: the column-lane kernel
    (2, 20, 24, 9, 32, 3, 1, 2, (2, 2, 2, 2), 1),
    (1, 16, 18, 12, 48, 1, 1, 1, (0, 0, 0, 0), 1),
    (1, 12, 40, 6, 16, 3, (2, 1), 1, (1, 1, 1, 1), 1),
    (1, 8, 54, 5, 64, 3, 1, 1, (1, 1, 1, 1), 1),
]


def _conv_module(n, c, k, h, w, kernel, stride, dilation, pads, groups):
    """A Relax module ``main(x, w)``: one convolution through ``emit_conv_vnni``."""
    from tvm import relax

    from mmdet_regptq.deploy.tvm.vnni import emit_conv_vnni

    bb = relax.BlockBuilder()
    x = relax.Var('x', relax.TensorType((n, c, h, w), 'int8'))
    wv = relax.Var('w', relax.TensorType((k, c // groups, kernel, kernel), 'int8'))
    with bb.function('main', [x, wv]):
        with bb.dataflow():
            y = bb.emit(emit_conv_vnni(bb, x, wv, stride, list(pads), dilation, groups))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _build(module, target):
    import tvm

    from mmdet_regptq.deploy.tvm.schedule import cpu_pipeline

    return tvm.compile(module, target=target, relax_pipeline=cpu_pipeline(target))


def _compile(*shape):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(_build(_conv_module(*shape), host_target()), tvm.cpu())


def _conv_main(emit, x: np.ndarray, weight: np.ndarray):
    """``main(x, w)`` of one ``emit(bb, x_var, w_var)`` convolution, as a module and its
    output on ``x``, ``weight`` (built for this CPU)."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    xv = relax.Var('x', relax.TensorType(x.shape, str(x.dtype)))
    wv = relax.Var('w', relax.TensorType(weight.shape, str(weight.dtype)))
    with bb.function('main', [xv, wv]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(emit(bb, xv, wv)))
        bb.emit_func_output(out)
    module = bb.get()
    vm = relax.VirtualMachine(_build(module, host_target()), tvm.cpu())
    return module, vm['main'](tvm.runtime.tensor(x), tvm.runtime.tensor(weight)).numpy()


def test_vnni_kernel_lowers_to_vpdpbusd_for_a_vnni_target():
    """Runs on any machine: cross-compiled for a VNNI CPU (``cascadelake``), the kernel's
    inner loop is ``vpdpbusd`` on zmm registers. (Its values need such a CPU to run on:
    the bit-exact tests below.)"""
    import tvm

    target = tvm.target.Target({'kind': 'llvm', 'mcpu': 'cascadelake'})
    assert has_vnni(target)
    executable = _build(_conv_module(*SHAPES[0]), target)
    asm = ''.join(m.inspect_source('asm') for m in executable.mod.imports)
    assert asm.count('vpdpbusd') >= 16 and 'zmm' in asm


@pytest.mark.skipif(not has_vnni(host_target()), reason='this CPU has no AVX-512 VNNI')
@pytest.mark.parametrize('shape', SHAPES,
                         ids=[f'n{s[0]}c{s[1]}k{s[2]}s{s[6]}d{s[7]}g{s[9]}' for s in SHAPES])
def test_vnni_conv_is_bit_exact(shape):
    import tvm

    n, c, k, h, w, kernel, stride, dilation, pads, groups = shape
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (n, c, h, w)).astype(np.int8)
    weight = rng.integers(-128, 128, (k, c // groups, kernel, kernel)).astype(np.int8)
    x[0, 0, 0, :4] = [-128, 127, -128, 127]          # the range ends
    padded = torch.nn.functional.pad(torch.from_numpy(x).double(),
                                     (pads[1], pads[3], pads[0], pads[2]))
    ref = torch.nn.functional.conv2d(padded, torch.from_numpy(weight).double(), stride=stride,
                                     dilation=dilation, groups=groups).numpy().astype(np.int64)
    vm = _compile(*shape)
    out = vm['main'](tvm.runtime.tensor(x), tvm.runtime.tensor(weight)).numpy()
    assert out.dtype == np.int32 and out.shape == ref.shape
    assert np.array_equal(out.astype(np.int64), ref)


def test_has_vnni_is_false_for_a_cpu_without_it():
    import tvm

    assert not has_vnni(tvm.target.Target({'kind': 'llvm', 'mcpu': 'haswell'}))


@pytest.mark.skipif(not has_vnni(host_target()), reason='this CPU has no AVX-512 VNNI')
@pytest.mark.parametrize('groups', [1, 2])
def test_vnni_wide_conv_of_uint8_codes_is_bit_exact(groups):
    """The 8-bit first layer: uint8 codes minus their zero point times centred 8-bit
    weights in [-255, 255] (split into two int8 halves)."""
    from mmdet_regptq.deploy.tvm.vnni import emit_conv_vnni_wide

    n, c, k, h, kernel, stride, pads, z_x = 1, 4, 12, 15, 7, 2, 3, 37
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, c, h, h)).astype(np.uint8)
    weight = rng.integers(-255, 256, (k, c // groups, kernel, kernel)).astype(np.int16)
    weight[0, 0, 0, :3] = [-255, 255, -16]
    _, got = _conv_main(lambda bb, xv, wv: emit_conv_vnni_wide(bb, xv, wv, stride, pads, 1,
                                                               groups, z_x), x, weight)
    centred = torch.from_numpy(x.astype(np.float64) - z_x)
    ref = torch.nn.functional.conv2d(centred, torch.from_numpy(weight).double(), stride=stride,
                                     padding=pads, groups=groups).numpy().astype(np.int64)
    assert np.array_equal(got.astype(np.int64), ref)


@pytest.mark.skipif(not has_vnni(host_target()), reason='this CPU has no AVX-512 VNNI')
@pytest.mark.parametrize('m,k,n', [(100, 3136, 256), (7, 30, 5)])
def test_matmul_integer_runs_on_the_vnni_kernel_bit_exact(m, k, n):
    """ONNX MatMulInteger (a Linear layer of the RoI head) compiles to the VNNI kernel
    (as a 1x1 convolution over the rows) and equals the int64 product."""
    import onnx
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax

    from mmdet_regptq.deploy.tvm.build import compile_onnx

    rng = np.random.default_rng(1)
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    b = rng.integers(-128, 128, (k, n)).astype(np.int8)
    a[0, :4] = [-128, 127, -128, 127]
    graph = helper.make_graph(
        [helper.make_node('MatMulInteger', ['a', 'b'], ['y'])], 'mm',
        [helper.make_tensor_value_info('a', TensorProto.INT8, [m, k])],
        [helper.make_tensor_value_info('y', TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(b, 'b')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    used: dict = {}
    executable = compile_onnx(model, {'a': [m, k]}, used=used)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm['main'](tvm.runtime.tensor(a)).numpy()
    assert list(used.values()) == ['vnni'], 'MatMulInteger did not take the VNNI kernel'
    assert np.array_equal(out.astype(np.int64), a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.skipif(not has_vnni(host_target()), reason='this CPU has no AVX-512 VNNI')
@pytest.mark.parametrize('kernel,mcpu,peak', [('vnni', None, 127), ('avx2', 'haswell', 64)])
def test_uint8_codes_times_int8_weights_take_one_kernel_call_bit_exact(kernel, mcpu, peak):
    """W4A8's ConvInteger (uint8 activation codes with a zero point, centred int8 weights,
    no weight zero point) runs the int8 kernel once (K output channels, not the 2K of the
    split 8-bit-weight path) and equals the int64 convolution."""
    import onnx
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax

    from mmdet_regptq.deploy.tvm.build import compile_onnx

    n, c, k, h, z_x = 1, 20, 24, 13, 37
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (n, c, h, h)).astype(np.uint8)
    x[0, 0, 0, :2] = [0, 255]
    weight = rng.integers(-peak, peak + 1, (k, c, 3, 3)).astype(np.int8)
    weight[0, 0, 0, :2] = [-peak, peak]
    graph = helper.make_graph(
        [helper.make_node('ConvInteger', ['x', 'w', 'zx'], ['y'], pads=[1, 1, 1, 1],
                          strides=[2, 2])], 'w4a8',
        [helper.make_tensor_value_info('x', TensorProto.UINT8, list(x.shape)),
         helper.make_tensor_value_info('w', TensorProto.INT8, list(weight.shape))],
        [helper.make_tensor_value_info('y', TensorProto.INT32, [n, k, 7, 7])],
        [numpy_helper.from_array(np.array(z_x, np.uint8), 'zx')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    used: dict = {}
    exe = compile_onnx(model, {'x': list(x.shape), 'w': list(weight.shape)},
                       target=host_target(mcpu), kernel=kernel, used=used,
                       bounds={'w': peak})
    assert used == {'w': kernel}                    # not the split path ('..._split')
    text = exe.as_text() if hasattr(exe, 'as_text') else ''
    assert f'_k{2 * k}_' not in text
    got = relax.VirtualMachine(exe, tvm.cpu())['main'](
        tvm.runtime.tensor(x), tvm.runtime.tensor(weight)).numpy()
    ref = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64) - z_x),
                                     torch.from_numpy(weight).double(), stride=2, padding=1)
    assert np.array_equal(got.astype(np.int64), ref.numpy().astype(np.int64))


def _epilogue_module(c, k, hw, weight, scale, bias, fuse, isa='vnni'):
    """``main(x)``: a 3x3 conv through ``emit_conv_vnni`` (``isa``'s kernel) and the
    epilogue our integer graph puts after it (float rescale, bias, ReLU, quantize to the
    next layer's codes)."""
    import tvm
    from tvm import relax

    from mmdet_regptq.deploy.tvm.vnni import emit_conv_vnni

    bb = relax.BlockBuilder()
    x = relax.Var('x', relax.TensorType((1, c, hw, hw), 'int8'))
    with bb.function('main', [x]):
        with bb.dataflow():
            acc = bb.emit(emit_conv_vnni(bb, x, relax.const(weight), 1, 1, 1, isa=isa,
                                         fuse_epilogue=fuse))
            y = bb.emit(relax.op.astype(acc, 'float32'))
            y = bb.emit(relax.op.add(relax.op.multiply(y, relax.const(scale)),
                                     relax.const(bias)))
            y = bb.emit(relax.op.nn.relu(y))
            y = bb.emit(relax.op.quantize(y, relax.const(np.float32(0.05)),
                                          relax.const(np.int8(-8)), axis=1, out_dtype='int8'))
            out = bb.emit_output(relax.op.clip(y, -8, 7))
        bb.emit_func_output(out)
    return bb.get(), tvm


def _fused_kernels(module) -> list[str]:
    """Names of the functions in which FuseOps put one of our kernels together with other
    ops."""
    import tvm
    from tvm import relax

    with host_target():
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(),
            relax.transform.FuseTIR()])(module)
    return [gv.name_hint for gv, _ in mod.functions_items()
            if gv.name_hint.startswith(('fused_conv_vnni', 'fused_conv_avx2'))]


@pytest.mark.parametrize('isa,k,hw,fusable', [
    ('vnni', 64, 24, True), ('vnni', 40, 24, False), ('vnni', 40, 32, True),
    ('vnni', 54, 32, True), ('vnni', 11, 32, False),
    ('avx2', 64, 24, True), ('avx2', 40, 24, True), ('avx2', 54, 32, False),
    ('avx2', 11, 32, False)])
def test_fused_epilogue_gives_the_same_codes(isa, k, hw, fusable):
    """The epilogue fused into the kernel (computed per tile) gives the same int8 codes as
    the separate pass, bit for bit; a K that is not a multiple of a tile's channels stays
    unfused (and still correct). VNNI: 32 channels on the channel-lane kernel (24 columns
    here), a divisor of K from 4 to 8 on the column-lane kernel (32 columns: 6 for K = 54,
    none for K = 11); AVX2: 16 channels where K / 8 is even, else 8."""
    from tvm import relax

    from mmdet_regptq.deploy.tvm.avx2 import epilogue_fusable_avx2
    from mmdet_regptq.deploy.tvm.vnni import epilogue_fusable, has_avx2

    if not (has_vnni if isa == 'vnni' else has_avx2)(host_target()):
        pytest.skip(f'this CPU has no {isa.upper()}')

    c = 32
    rng = np.random.default_rng(0)
    weight = rng.integers(-8, 8, (k, c, 3, 3)).astype(np.int8)
    scale = (rng.random((k, 1, 1)) * 0.004 + 0.001).astype(np.float32)
    bias = rng.standard_normal((k, 1, 1)).astype(np.float32)
    xs = [rng.integers(-8, 8, (1, c, hw, hw)).astype(np.int8) for _ in range(4)]
    assert (epilogue_fusable(k, hw) if isa == 'vnni' else epilogue_fusable_avx2(k, hw)) \
        == fusable
    outs = []
    for fuse in (True, False):
        module, tvm = _epilogue_module(c, k, hw, weight, scale, bias, fuse, isa)
        assert bool(_fused_kernels(module)) == (fuse and fusable)
        vm = relax.VirtualMachine(_build(module, host_target()), tvm.cpu())
        outs.append([vm['main'](tvm.runtime.tensor(x)).numpy() for x in xs])
    for fused, separate in zip(*outs):
        assert fused.dtype == np.int8 and len(np.unique(fused)) > 4    # not all clipped
        np.testing.assert_array_equal(fused, separate)


@pytest.mark.skipif(not has_vnni(host_target()), reason='this CPU has no AVX-512 VNNI')
@pytest.mark.parametrize('k,stride,z_w', [(16, 2, 'channel'), (12, 1, 'scalar'), (16, 2, None)])
def test_vnni_conv_of_uint8_weight_codes_is_bit_exact(k, stride, z_w):
    """The 8-bit first layer in one kernel call: uint8 input codes minus their zero point
    times uint8 weight codes minus theirs (per channel, scalar, none), the full code
    ranges at the edges."""
    from tvm import relax

    from mmdet_regptq.deploy.tvm.vnni import emit_conv_vnni_u8_weights

    n, c, h, kernel, pads, z_x = 1, 3, 21, 7, 3, 114
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (n, c, h, h)).astype(np.uint8)
    x[0, 0, 0, :4] = [0, 255, 0, 255]
    weight = rng.integers(0, 256, (k, c, kernel, kernel)).astype(np.uint8)
    weight[0, 0, 0, :3] = [0, 255, 0]
    zero = {'channel': rng.integers(0, 256, k).astype(np.uint8),
            'scalar': np.array(200, np.uint8), None: None}[z_w]
    zp = None if zero is None else relax.const(zero)
    _, got = _conv_main(lambda bb, xv, wv: emit_conv_vnni_u8_weights(bb, xv, wv, zp, stride,
                                                                     pads, 1, z_x), x, weight)
    centred_w = weight.astype(np.float64) - (0 if zero is None else
                                             zero.astype(np.float64).reshape(-1, 1, 1, 1))
    padded = torch.nn.functional.pad(torch.from_numpy(x.astype(np.float64) - z_x),
                                     (pads,) * 4)
    ref = torch.nn.functional.conv2d(padded, torch.from_numpy(centred_w), stride=stride)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got.astype(np.int64), ref.numpy().astype(np.int64))


@pytest.mark.skipif(not has_vnni(host_target()), reason='this CPU has no AVX-512 VNNI')
def test_column_lane_kernel_takes_uint8_codes_bit_exact():
    """uint8 activation codes with a zero point (W4A8) on the column-lane kernel (row
    stride 1, 32 output columns): equal to the int64 convolution of ``x - z_x``."""
    from mmdet_regptq.deploy.tvm.vnni import cols_applicable, emit_conv_vnni

    n, c, k, h, w, z_x = 1, 12, 16, 5, 32, 37
    assert cols_applicable(1, w)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (n, c, h, w)).astype(np.uint8)
    x[0, 0, 0, :2] = [0, 255]
    weight = rng.integers(-128, 128, (k, c, 3, 3)).astype(np.int8)
    module, got = _conv_main(lambda bb, xv, wv: emit_conv_vnni(bb, xv, wv, 1, 1, 1, 1, z_x),
                             x, weight)
    assert any('vnni_cols' in gv.name_hint for gv, _ in module.functions_items())
    padded = torch.nn.functional.pad(torch.from_numpy(x.astype(np.float64) - z_x), (1,) * 4)
    ref = torch.nn.functional.conv2d(padded, torch.from_numpy(weight).double())
    np.testing.assert_array_equal(got.astype(np.int64), ref.numpy().astype(np.int64))
