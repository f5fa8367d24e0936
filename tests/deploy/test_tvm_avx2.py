"""The AVX2 int8 convolution of the TVM backend (CPUs without AVX-512 VNNI): chosen from the
target CPU, bit-exact against an int64 reference, refused for weights that could saturate
its int16 pair sums, and a whole W4A4 model built for ``haswell`` equal to the fake-quant
model. Built for ``haswell`` (AVX2), the code runs on any AVX2 CPU, VNNI or not."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdet_regptq.deploy.tvm.build import host_target
from mmdet_regptq.deploy.tvm.vnni import has_avx2

needs_avx2 = pytest.mark.skipif(not has_avx2(host_target()), reason='this CPU has no AVX2')

SHAPES = [
    # N, C, K, H, W, kernel, stride, dilation, pads (top, left, bottom, right), groups
    (1, 64, 64, 16, 16, 3, 1, 1, (1, 1, 1, 1), 1),
    (2, 3, 40, 17, 13, 3, 2, 1, (1, 1, 1, 1), 1),
    (1, 20, 12, 9, 11, 1, 1, 1, (0, 0, 0, 0), 1),
    (1, 16, 18, 12, 12, 3, 1, 2, (2, 2, 2, 2), 1),
    (2, 8, 16, 10, 10, 3, 2, 1, (0, 1, 1, 0), 1),
    (1, 16, 8, 7, 7, 3, 1, 1, (1, 1, 1, 1), 4),
]


def _target(mcpu):
    import tvm

    return tvm.target.Target({'kind': 'llvm', 'mcpu': mcpu})


def _conv_module(n, c, k, h, w, kernel, stride, dilation, pads, groups, isa='avx2',
                 max_weight=None):
    """A Relax module ``main(x, w)``: one convolution through ``emit_conv_vnni(isa=...)``
    (``max_weight``: the ``max |w|`` the AVX2 kernel may assume)."""
    from tvm import relax

    from mmdet_regptq.deploy.tvm.vnni import emit_conv_vnni

    bb = relax.BlockBuilder()
    x = relax.Var('x', relax.TensorType((n, c, h, w), 'int8'))
    wv = relax.Var('w', relax.TensorType((k, c // groups, kernel, kernel), 'int8'))
    with bb.function('main', [x, wv]):
        with bb.dataflow():
            y = bb.emit(emit_conv_vnni(bb, x, wv, stride, list(pads), dilation, groups,
                                       isa=isa, max_weight=max_weight))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _build(module, target):
    import tvm

    from mmdet_regptq.deploy.tvm.schedule import cpu_pipeline

    return tvm.compile(module, target=target, relax_pipeline=cpu_pipeline(target))


def _reference(x, weight, stride, dilation, pads, groups):
    padded = torch.nn.functional.pad(torch.from_numpy(x).double(),
                                     (pads[1], pads[3], pads[0], pads[2]))
    return torch.nn.functional.conv2d(padded, torch.from_numpy(weight).double(), stride=stride,
                                      dilation=dilation, groups=groups).numpy().astype(np.int64)


def _run_conv(shape, x, weight, isa='avx2', max_weight=None):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(_build(_conv_module(*shape, isa=isa, max_weight=max_weight),
                                     _target('haswell')), tvm.cpu())
    return vm['main'](tvm.runtime.tensor(x), tvm.runtime.tensor(weight)).numpy()


@pytest.mark.parametrize('mcpu,kernel', [
    ('haswell', 'avx2'), ('znver2', 'avx2'), ('skylake-avx512', 'avx2'),
    ('cascadelake', 'vnni'), ('znver4', 'vnni'), ('x86-64', 'generic'), ('nehalem', 'generic')])
def test_int8_kernel_is_chosen_from_the_target_cpu(mcpu, kernel):
    from mmdet_regptq.deploy.tvm.vnni import int8_kernel

    assert int8_kernel(host_target(mcpu)) == kernel


def test_kernel_and_target_options_are_checked():
    from mmdet_regptq.deploy.tvm.build import deploy_target
    from mmdet_regptq.deploy.tvm.vnni import int8_kernel

    with pytest.raises(ValueError, match='needs a target with AVX-512 VNNI'):
        int8_kernel(host_target('haswell'), 'vnni')
    with pytest.raises(ValueError, match='needs a target with AVX2'):
        int8_kernel(host_target('nehalem'), 'avx2')
    with pytest.raises(ValueError, match="kernel='sse'.*'auto', 'vnni', 'avx2', 'generic'"):
        int8_kernel(host_target('haswell'), 'sse')
    assert int8_kernel(host_target('cascadelake'), 'generic') == 'generic'
    with pytest.raises(ValueError, match="mcpu='haswel' is not a CPU LLVM knows.*haswell"):
        host_target('haswel')
    assert str(deploy_target(None, 'avx2').attrs['mcpu']) == 'haswell'
    assert str(deploy_target('znver2').attrs['mcpu']) == 'znver2'
    with pytest.raises(ValueError, match="target_cpu='arm'; allowed: 'host', 'avx2', 'vnni'"):
        deploy_target(None, 'arm')
    with pytest.raises(ValueError, match='both name the target CPU'):
        deploy_target('znver2', 'vnni')


def test_avx2_kernel_lowers_to_vpmaddubsw_on_ymm_registers():
    """Cross-compiled for ``haswell``: ``vpmaddubsw`` + ``vpmaddwd`` on 256-bit registers,
    no AVX-512 instruction (so it runs on an AVX2-only CPU)."""
    executable = _build(_conv_module(*SHAPES[0]), _target('haswell'))
    asm = ''.join(m.inspect_source('asm') for m in executable.mod.imports)
    assert asm.count('vpmaddubsw') >= 8 and asm.count('vpmaddwd') >= 8
    assert 'ymm' in asm and 'zmm' not in asm and 'vpdpbusd' not in asm


@needs_avx2
@pytest.mark.parametrize('shape', SHAPES,
                         ids=[f'n{s[0]}c{s[1]}k{s[2]}s{s[6]}d{s[7]}g{s[9]}' for s in SHAPES])
def test_avx2_conv_is_bit_exact(shape):
    """Activations over the whole int8 range, weights over the kernel's ``[-64, 64]``; the
    largest pair sums (``2 * 255 * 64``, both signs) included."""
    n, c, k, h, w, kernel, stride, dilation, pads, groups = shape
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (n, c, h, w)).astype(np.int8)
    weight = rng.integers(-64, 65, (k, c // groups, kernel, kernel)).astype(np.int8)
    x[0, :, :2, :2] = 127                               # code + 128 = 255 in every channel
    weight[0, :, 0, 0], weight[-1, :, 0, 0] = 64, -64
    out = _run_conv(shape, x, weight)
    ref = _reference(x, weight, stride, dilation, pads, groups)
    assert out.dtype == np.int32 and out.shape == ref.shape
    assert np.array_equal(out.astype(np.int64), ref)


@pytest.mark.parametrize('peak,sums', [(8, 8), (15, 4), (16, 4), (17, 3), (32, 2), (64, 1),
                                       (65, 1), (1, 16), (None, 1)])
def test_int16_sums_stay_within_int16(peak, sums):
    """How many pair sums (each up to ``2 * 255 * |w|``) the kernel adds in int16, and the
    weight limit that many allow, which the runner checks at load."""
    from mmdet_regptq.deploy.tvm.avx2 import int16_sums, weight_limit

    assert int16_sums(peak) == sums
    if peak is not None and peak <= 64:
        assert sums * 2 * 255 * peak <= 32767 and weight_limit(sums) >= peak
        assert sums == 16 or (sums + 1) * 2 * 255 * peak > 32767


#: layers whose kernels add pair sums in int16 (>= 32 input channels per group, > 1x1)
INT16_SHAPES = [
    (1, 64, 64, 16, 16, 3, 1, 1, (1, 1, 1, 1), 1),
    (2, 40, 24, 9, 11, 3, 2, 1, (1, 1, 1, 1), 1),     # 10 channel blocks: 5 per widening
    (1, 64, 18, 12, 12, 3, 1, 2, (2, 2, 2, 2), 1),
    (1, 64, 16, 10, 10, 3, 1, 1, (0, 1, 1, 0), 2),
    (1, 96, 40, 7, 7, 5, 1, 1, (2, 2, 2, 2), 1),
]


@pytest.mark.parametrize('c,kh,peak,group', [(64, 3, 8, 8), (64, 3, 15, 4), (40, 3, 8, 5),
                                             (64, 1, 8, 1), (16, 3, 8, 1), (64, 3, 64, 1),
                                             (64, 3, None, 1), (96, 3, 2, 12)])
def test_int16_group_per_layer(c, kh, peak, group):
    from mmdet_regptq.deploy.tvm.avx2 import int16_group

    assert int16_group(c, kh, kh, peak) == group


@pytest.mark.parametrize('shape,peak,limit', [([64, 64, 3, 3], 8, 8), ([64, 64, 3, 3], 12, 16),
                                              ([16, 8, 3, 3], 8, 64), ([64, 64, 1, 1], 8, 64),
                                              ([3136, 256], 8, 64)])
def test_avx2_weight_limit_recorded_per_layer(shape, peak, limit):
    """What ``meta.json`` records for the runner's check: the ``max |w|`` the layer's kernel
    is exact for (a 2-D weight is a matrix product: a 1x1 kernel), and the runner refuses
    more."""
    from mmdet_regptq.deploy.tvm.build import _avx2_limit
    from mmdet_regptq.deploy.tvm.runner import check_avx2_weight

    assert _avx2_limit(shape, peak) == limit
    check_avx2_weight('w', np.full(3, limit), limit)
    with pytest.raises(ValueError, match=rf'max \|w\| = {limit + 1} > {limit}'):
        check_avx2_weight('w', np.full(3, -limit - 1), limit)


@needs_avx2
@pytest.mark.parametrize('peak', [8, 15, 16])
@pytest.mark.parametrize('shape', INT16_SHAPES, ids=[f'n{s[0]}c{s[1]}k{s[2]}s{s[6]}d{s[7]}'
                                                     f'g{s[9]}' for s in INT16_SHAPES])
def test_avx2_int16_sums_are_bit_exact(shape, peak):
    """Weights within ``peak`` (4-bit: 8, centred asymmetric 4-bit: 15, the split first
    layer's halves: 16): several steps' pair sums added in int16 before widening, at the
    worst case (every input code + 128 = 255 and every weight ``+-peak`` on some outputs),
    equal to the int64 reference."""
    n, c, k, h, w, kernel, stride, dilation, pads, groups = shape
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (n, c, h, w)).astype(np.int8)
    weight = rng.integers(-peak, peak + 1, (k, c // groups, kernel, kernel)).astype(np.int8)
    x[0, :, :4, :4] = 127
    weight[0], weight[-1] = peak, -peak
    out = _run_conv(shape, x, weight, max_weight=peak)
    assert np.array_equal(out.astype(np.int64),
                          _reference(x, weight, stride, dilation, pads, groups))


def test_int16_sums_kernel_adds_pair_sums_before_widening():
    """The kernel of a 4-bit layer (64 input channels: 16 blocks of 4) widens once per 8
    blocks, not once per step: fewer ``vpmaddwd`` than ``vpmaddubsw`` in its code."""
    shape = (1, 64, 16, 8, 8, 3, 1, 1, (1, 1, 1, 1), 1)
    asm = {}
    for peak in (64, 8):
        executable = _build(_conv_module(*shape, max_weight=peak), _target('haswell'))
        asm[peak] = ''.join(m.inspect_source('asm') for m in executable.mod.imports)
    assert asm[64].count('vpmaddwd') >= asm[64].count('vpmaddubsw')
    assert 4 * asm[8].count('vpmaddwd') <= asm[8].count('vpmaddubsw')


@needs_avx2
def test_weights_that_could_saturate_take_the_generic_schedule():
    """``|w| > 64``: the kernel's int16 pair sums would saturate (shown on the kernel
    itself), so ``compile_onnx`` gives that layer the generic schedule — exact — and keeps
    the AVX2 kernel for a layer within ``[-64, 64]``."""
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax

    from mmdet_regptq.deploy.tvm.build import compile_onnx

    shape = (1, 8, 16, 6, 6, 3, 1, 1, (1, 1, 1, 1), 1)
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, (1, 8, 6, 6)).astype(np.int8)
    x[0, :, 2:4, 2:4] = 127
    wide = rng.integers(-128, 128, (16, 8, 3, 3)).astype(np.int8)
    wide[:4] = 127
    ref = _reference(x, wide, 1, 1, (1, 1, 1, 1), 1)
    forced = _run_conv(shape, x, wide).astype(np.int64)
    assert not np.array_equal(forced, ref), 'expected int16 saturation on the AVX2 kernel'

    narrow = np.clip(wide, -64, 64).astype(np.int8)
    for weight, kernels in ((wide, []), (narrow, ['avx2'])):
        graph = helper.make_graph(
            [helper.make_node('ConvInteger', ['x', 'w'], ['y'], pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3])], 'conv',
            [helper.make_tensor_value_info('x', TensorProto.INT8, list(x.shape))],
            [helper.make_tensor_value_info('y', TensorProto.INT32, [1, 16, 6, 6])],
            [numpy_helper.from_array(weight, 'w')])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
        used: dict = {}
        executable = compile_onnx(model, {'x': list(x.shape)}, target=host_target('haswell'),
                                  used=used)
        out = relax.VirtualMachine(executable, tvm.cpu())['main'](tvm.runtime.tensor(x))
        assert list(used.values()) == kernels
        assert np.array_equal(out.numpy().astype(np.int64),
                              _reference(x, weight, 1, 1, (1, 1, 1, 1), 1))


@needs_avx2
def test_w4a4_model_built_for_avx2_matches_the_fake_quant_model(w4a4, tmp_path):
    """The tiny W4A4 net through mmdeploy's ``to_backend`` with ``mcpu='haswell'``: every
    integer layer (8-bit first layer split in two halves, a grouped conv, the Linear) on
    the AVX2 kernel, outputs equal to the fake-quant model's; a ``weights.npz`` whose values
    no longer fit the kernel is refused at load."""
    from mmdeploy.apis.utils import to_backend

    import mmdet_regptq.deploy  # noqa: F401  (registers tvm_int4)
    from mmdet_regptq.deploy.onnx.verify import max_abs_diff
    from mmdet_regptq.deploy.tvm.runner import TvmRunner

    model, x, path, _ = w4a4
    deploy_cfg = dict(backend_config=dict(type='tvm_int4', mcpu='haswell'))
    files = to_backend('tvm_int4', [str(path)], str(tmp_path), deploy_cfg=deploy_cfg)
    meta = json.loads(Path(files[2]).read_text())
    assert meta['int8_kernel'] == 'avx2' and '"mcpu":"haswell"' in meta['target']
    assert sorted(meta['kernels'].values()) == ['avx2_int8'] * 3 + ['avx2_int8_split']
    limits = meta['avx2_weight_limits']      # TinyNet's layers are too narrow for int16 sums
    assert sorted(limits) == sorted(k for k, v in meta['kernels'].items() if v == 'avx2_int8')
    assert set(limits.values()) == {64}
    out = TvmRunner(Path(files[0]).parent)({'input': x})
    with torch.no_grad():
        ref = model(x)
    assert max_abs_diff(ref, [out['feat'], out['logits']]) < 1e-4

    stored = dict(np.load(files[1]))
    first_avx2 = next(i for i, w in enumerate(meta['weights'])
                      if meta['kernels'][w['name']] == 'avx2_int8')
    limit = limits[meta['weights'][first_avx2]['name']]
    stored[f'w{first_avx2}.zero_point'] = stored[f'w{first_avx2}.zero_point'] + limit
    np.savez(files[1], **stored)
    with pytest.raises(ValueError, match=rf'max \|w\| = \d+ > {limit}, but the artifact runs '
                                         rf'it on the AVX2 kernel built for \|w\| <= {limit}'):
        TvmRunner(Path(files[0]).parent)
