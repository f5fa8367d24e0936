"""ONNX Runtime INT8 on x86 CPUs without VNNI: the int8 / uint8 weight layout per target
CPU, ``w_reduce_range`` models stored int8 within +-64, and the AVX2 kernels themselves
(run natively through the CPUID shim where the machine allows it)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mmdet_regptq.deploy import export_onnx, make_ort_int8
from mmdet_regptq.deploy.onnx.ort_int8 import (SAFE_U8S8, OrtInt8Report, recentre_weights,
                                               saturating_weights, u8s8_saturates)
from mmdet_regptq.deploy.onnx.verify import onnx_code_names, ort_run, teacher_forced_codes

from deploy_toy import ResidualNet, make_quantized

SYMMETRIC = dict(type='Uniform', per_channel=True, symmetric=True, scale_method='minmax')


# ---------------------------------------------------------------- layout (any CPU)
def _dq_graph(weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """One per-channel DequantizeLinear (axis 0) per weight, each a graph output."""
    nodes, inits, outputs = [], [], []
    for name, (codes, zp) in weights.items():
        scale = np.linspace(0.01, 0.04, codes.shape[0]).astype(np.float32)
        inits += [numpy_helper.from_array(codes, f'{name}.int'),
                  numpy_helper.from_array(scale, f'{name}.scale'),
                  numpy_helper.from_array(zp, f'{name}.zp')]
        nodes.append(helper.make_node('DequantizeLinear', [f'{name}.int', f'{name}.scale',
                                                           f'{name}.zp'], [name], axis=0))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, 'weights', [], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])


def _weights() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)

    def codes(lo: int, hi: int, dtype: type) -> np.ndarray:
        c = rng.integers(lo, hi + 1, (4, 3, 3, 3))
        c.flat[0], c.flat[1] = lo, hi                     # both ends of the grid occur
        return c.astype(dtype)
    return {
        # 4-bit asymmetric: |q - z| <= 15
        'w4': (codes(0, 15, np.uint8), np.array([3, 7, 8, 12], np.uint8)),
        # 8-bit symmetric, full grid: |q| up to 128
        'w8sym': (codes(-128, 127, np.int8), np.zeros(4, np.int8)),
        # 8-bit reduce-range grid: |q| <= 64
        'w8rr': (codes(-64, 64, np.int8), np.zeros(4, np.int8)),
        # 8-bit asymmetric, q - z outside int8: stays uint8 on every target
        'w8asym': (codes(0, 255, np.uint8), np.array([3, 128, 200, 250], np.uint8)),
        # 8-bit asymmetric whose q - z fits int8 but not +-64
        'w8mid': (codes(60, 190, np.uint8), np.full(4, 125, np.uint8)),
    }


@pytest.mark.parametrize('limit, int8, widened', [
    (127, ['w4', 'w8sym', 'w8rr', 'w8mid'], []),
    (SAFE_U8S8, ['w4', 'w8rr'], ['w8sym', 'w8mid']),
])
def test_recentre_weights_layout_per_int8_limit(limit, int8, widened):
    """``int8_limit=127`` (VNNI: int32 sums) stores every int8-able ``q - z`` as int8;
    ``SAFE_U8S8`` (AVX2: int16 pair sums) only ``|q - z| <= 64``, the rest uint8 with a
    zero point. The dequantized weights are unchanged either way."""
    model = _dq_graph(_weights())
    before = ort_run(model, {}, optimize=False)
    report = OrtInt8Report()
    recentre_weights(model, report, int8_limit=limit)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert sorted(report.recentred) == sorted(f'{n}.int' for n in int8)
    assert sorted(report.widened) == sorted(f'{n}.int' for n in widened)
    for name in _weights():
        codes, zp = inits[f'{name}.int'], inits[f'{name}.zp']
        if name in int8:
            assert codes.dtype == np.int8 and not zp.any(), name
        else:
            assert codes.dtype == np.uint8 and zp.dtype == np.uint8, name
        if name in widened and name == 'w8sym':      # signed codes: + 128, zero point 128
            assert (zp == 128).all() and codes.max() == 255, name
    after = ort_run(model, {}, optimize=False)
    for name in _weights():
        np.testing.assert_array_equal(before[name], after[name])
    assert (saturating_weights(model) == []) is (limit == SAFE_U8S8)


# ---------------------------------------------------------------- export of real models
def _export(policy: dict, path, **kwargs) -> tuple[torch.nn.Module, torch.Tensor, onnx.ModelProto]:
    model, x = make_quantized(policy, net=ResidualNet)
    export_onnx(model, x, path, output_names=['out'], **kwargs)
    return model, x, onnx.load(str(path))


def _weight_inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {i.name: i for i in model.graph.initializer}
    return {n.input[0]: numpy_helper.to_array(inits[n.input[0]]) for n in model.graph.node
            if n.op_type == 'DequantizeLinear' and n.input[0] in inits}


def test_reduce_range_export_is_int8_within_64_for_avx2(single_thread, tmp_path, caplog):
    model, x, proto = _export(dict(w_bits=8, a_bits=8, w_reduce_range=True),
                              tmp_path / 'rr.onnx', int4_weights=False)
    feeds = [{'input': x.numpy()}]
    with caplog.at_level(logging.WARNING, logger='mmdet_regptq.deploy.onnx.ort_int8'):
        fused, report = make_ort_int8(proto, feeds, target_cpu='avx2')
    assert report.target_cpu == 'avx2' and not report.widened and report.hint() == ''
    assert not [r for r in caplog.records if 'w_reduce_range' in r.getMessage()]
    weights = _weight_inits(fused)
    assert len(report.recentred) == 7 and set(report.recentred) <= set(weights)
    for name in report.recentred:
        codes = weights[name]
        assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() <= SAFE_U8S8, name
    assert saturating_weights(fused) == []
    # the same layout for a VNNI target: nothing to widen
    vnni, _ = make_ort_int8(proto, feeds, target_cpu='vnni')
    assert _weight_inits(vnni).keys() == weights.keys()


def test_full_8_bit_grid_needs_uint8_for_avx2_and_says_how_to_avoid_it(single_thread,
                                                                       tmp_path, caplog):
    _, x, proto = _export(dict(w_bits=8, a_bits=8, weight=SYMMETRIC), tmp_path / 'w8.onnx',
                          int4_weights=False)
    feeds = [{'input': x.numpy()}]
    fast, _ = make_ort_int8(proto, feeds, target_cpu='vnni')
    assert len(saturating_weights(fast)) == 7        # |q| up to 128: wrong without VNNI
    with caplog.at_level(logging.WARNING, logger='mmdet_regptq.deploy.onnx.ort_int8'):
        safe, report = make_ort_int8(proto, feeds, target_cpu='avx2')
    assert len(report.widened) == 7 and saturating_weights(safe) == []
    hints = [r.getMessage() for r in caplog.records if 'w_reduce_range=True' in r.getMessage()]
    assert len(hints) == 1 and '\n' not in hints[0] and '7 weights' in hints[0]
    with pytest.raises(ValueError, match=r"target_cpu='zen4' is unknown; allowed: "
                                         r"\['host', 'avx2', 'vnni'\]"):
        make_ort_int8(proto, feeds, target_cpu='zen4')


@pytest.mark.parametrize('w_bits', [4, 3, 2])
@pytest.mark.parametrize('int4_weights', [False, True])
def test_low_bit_weights_are_int8_for_avx2(single_thread, tmp_path, w_bits, int4_weights):
    """Weights of <= 7 bits fit +-64 after re-centring: int8 (u8 x s8) on AVX2 too, from
    int8/uint8 and INT4/UINT4 carriers alike."""
    _, x, proto = _export(dict(w_bits=w_bits, a_bits=8, first_layer_bits=None),
                          tmp_path / 'low.onnx', int4_weights=int4_weights)
    fused, report = make_ort_int8(proto, [{'input': x.numpy()}], target_cpu='avx2')
    assert len(report.recentred) == 7 and not report.widened, report.summary()
    for name in report.recentred:
        codes = _weight_inits(fused)[name].astype(int)
        assert _weight_inits(fused)[name].dtype == np.int8
        assert np.abs(codes).max() <= 2 ** w_bits - 1


def test_reduce_range_ort_matches_fake_quant(single_thread, tmp_path):
    """The reduce-range model in ORT against the fake-quant model: the Q/DQ export's codes
    within 1 LSB of every quantized tensor (teacher-forced); the fused INT8 graph for an
    AVX2 target is the VNNI target's graph (same initializers) and within the requantized
    outputs' half step of the fake-quant outputs."""
    model, x, proto = _export(dict(w_bits=8, a_bits=8, w_reduce_range=True),
                              tmp_path / 'rr.onnx', int4_weights=False)
    codes = onnx_code_names(proto)
    out = ort_run(proto, {'input': x.numpy()}, extra_outputs=list(codes.values()))
    lsb = teacher_forced_codes(model, (x,), {k: out[v] for k, v in codes.items()})
    assert len(lsb) == 7 and max(d.max_lsb for d in lsb) <= 1
    assert max(d.mismatch for d in lsb) < 0.01
    with torch.no_grad():
        ref = model(x).numpy()
    fused, _ = make_ort_int8(proto, [{'input': x.numpy()}], target_cpu='avx2')
    vnni, _ = make_ort_int8(proto, [{'input': x.numpy()}], target_cpu='vnni')
    assert [i.SerializeToString() for i in fused.graph.initializer] == \
        [i.SerializeToString() for i in vnni.graph.initializer]
    out = ort_run(fused, {'input': x.numpy()})['out']
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


# ---------------------------------------------------------------- the AVX2 kernels themselves
_RUN = """
import json, sys
import numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
outs = {}
for path in sys.argv[2:]:
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    outs[path] = sess.run(None, {'input': x})[0].tolist()
print(json.dumps(outs))
"""


def _run_ort(paths: list[str], x_path: str, env: dict | None = None) -> dict[str, np.ndarray]:
    done = subprocess.run([sys.executable, '-c', _RUN, x_path, *paths], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {k: np.asarray(v, np.float32) for k, v in json.loads(done.stdout).items()}


def test_avx2_kernels_saturate_only_the_wide_int8_layout(single_thread, tmp_path):
    """ORT's own AVX2 u8 x s8 kernel, run natively with the CPUID shim, against its VNNI
    kernel in this process: the reduce-range model and the uint8 layout agree bit for bit,
    the full 8-bit int8 layout does not (int16 pair sums saturate)."""
    from mmdet_regptq.deploy.onnx.avx2_shim import avx2_env, build_avx2_shim, cpuid_faulting

    problem = cpuid_faulting()
    if problem or u8s8_saturates():
        pytest.skip(f'needs a VNNI CPU with CPUID faulting: {problem or "no VNNI here"}')
    lib = build_avx2_shim(tmp_path / 'shim')
    paths = {}
    for tag, policy, target in (('rr', dict(w_reduce_range=True), 'avx2'),
                                ('u8', dict(weight=SYMMETRIC), 'avx2'),
                                ('s8', dict(weight=SYMMETRIC), 'vnni')):
        _, x, proto = _export(dict(w_bits=8, a_bits=8, **policy), tmp_path / f'{tag}.onnx',
                              int4_weights=False)
        x = x * 3                                  # activations near 255: large pair sums
        fused, _ = make_ort_int8(proto, [{'input': x.numpy()}], target_cpu=target)
        paths[tag] = str(tmp_path / f'{tag}_ort.onnx')
        onnx.save(fused, paths[tag])
        np.save(tmp_path / f'x_{tag}.npy', x.numpy())
    probe = 'from mmdet_regptq.deploy.onnx.ort_int8 import u8s8_saturates as s; print(s())'
    seen = subprocess.run([sys.executable, '-c', probe], env=avx2_env(lib), text=True,
                          capture_output=True, timeout=120)
    assert seen.stdout.split()[-1:] == ['True'], seen.stderr[-2000:]   # 'host' there: avx2
    for tag, path in paths.items():
        x_path = str(tmp_path / f'x_{tag}.npy')
        native = _run_ort([path], x_path)[path]
        avx2 = _run_ort([path], x_path, env=avx2_env(lib))[path]
        diff = float(np.abs(native - avx2).max())
        print(f'{tag}: max |VNNI - AVX2| = {diff:.4g}')
        if tag == 's8':
            assert diff > 0, 'the full 8-bit int8 layout should saturate on AVX2'
        else:
            np.testing.assert_array_equal(native, avx2)


_SHIM_PROBE = """
import faulthandler, sys
import torch                     # (replaces faulthandler's SIGSEGV handler: enable after)
faulthandler.enable()            # the program's own SIGSEGV handler, after the shim's
print(torch.backends.cpu.get_cpu_capability(), flush=True)   # CPUIDs after it
if sys.argv[1:] == ['crash']:
    import ctypes
    ctypes.string_at(0)
"""


def test_avx2_shim_keeps_answering_cpuid_under_a_programs_own_segv_handler(tmp_path):
    """TVM (here: Python's faulthandler) installs a SIGSEGV handler after the shim's; the
    shim keeps its own, still answers CPUID with AVX2 only, and hands a real fault to the
    program's handler (faulthandler's report, then death by SIGSEGV)."""
    from mmdet_regptq.deploy.onnx.avx2_shim import avx2_env, build_avx2_shim, cpuid_faulting

    problem = cpuid_faulting()
    if problem:
        pytest.skip(f'needs CPUID faulting: {problem}')
    lib = build_avx2_shim(tmp_path / 'shim')
    env = avx2_env(lib)
    done = subprocess.run([sys.executable, '-c', _SHIM_PROBE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1:] == ['AVX2']
    crash = subprocess.run([sys.executable, '-c', _SHIM_PROBE, 'crash'], env=env,
                           capture_output=True, text=True, timeout=300)
    assert crash.stdout.split()[-1:] == ['AVX2']
    assert crash.returncode == -11, (crash.returncode, crash.stderr[-2000:])
    assert 'Segmentation fault' in crash.stderr


def test_shim_cli_prints_only_the_library_path(tmp_path):
    """``SHIM=$(python -m mmdet_regptq.deploy.onnx.avx2_shim DIR)`` as the docs use it:
    stdout is the path alone (no mmengine log lines from the package imports)."""
    done = subprocess.run([sys.executable, '-m', 'mmdet_regptq.deploy.onnx.avx2_shim',
                           str(tmp_path / 'shim')], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines == [str(tmp_path / 'shim' / 'libcpuid_avx2.so')]
    assert Path(lines[0]).is_file()


# ---------------------------------------------------------------- deploy config / CLI
def test_target_cpu_deploy_option_and_cli():
    import importlib.util
    from pathlib import Path

    from mmdet_regptq.deploy.mmdeploy.options import regptq_options

    assert regptq_options({})['target_cpu'] == 'host'
    assert regptq_options({'regptq': {'target_cpu': 'avx2'}})['target_cpu'] == 'avx2'
    with pytest.raises(ValueError, match=r"regptq.target_cpu='znver4'; allowed: 'host', "
                                         r"'avx2', 'vnni'"):
        regptq_options({'regptq': {'target_cpu': 'znver4'}})
    path = Path(__file__).resolve().parents[2] / 'tools/deploy.py'
    spec = importlib.util.spec_from_file_location('deploy_cli', path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.parse_args(['d.py', 'm.py', 'q.pth', 'img.jpg']).target_cpu is None
    assert cli.parse_args(['d.py', 'm.py', 'q.pth', 'img.jpg',
                           '--target-cpu', 'avx2']).target_cpu == 'avx2'
    with pytest.raises(SystemExit):
        cli.parse_args(['d.py', 'm.py', 'q.pth', 'img.jpg', '--target-cpu', 'sse4'])


def test_mmdeploy_pipeline_builds_for_an_avx2_target(single_thread, tmp_path):
    """A W8A8 RetinaNet with full 8-bit weight grids deployed for ``target_cpu='avx2'``:
    the graph has no weight that saturates without VNNI, and the notes say how to keep
    ORT on its fast kernel (``w_reduce_range``)."""
    from pathlib import Path

    from mmdeploy.utils import load_config

    import mmdet_regptq  # noqa: F401
    from mmdet_regptq.deploy import build_detector, quantize_for_deploy
    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy

    root = Path(__file__).resolve().parents[2]
    config = root / 'configs/synthetic/retinanet_r18-16_fpn64_synthetic.py'
    torch.manual_seed(0)
    model = build_detector(str(config))
    quantize_for_deploy(model, quant=dict(w_bits=8, a_bits=8, weight=SYMMETRIC),
                        method=dict(type='MinMax'), input_shape=(64, 64))
    model._regptq_quantized = True
    deploy_cfg, model_cfg = load_config(
        str(root / 'deploy_configs/detection_onnxruntime-int8_static-512x512.py'), str(config))
    deploy_cfg.onnx_config.input_shape = [64, 64]
    deploy_cfg.merge_from_dict({'regptq.calib_images': 1, 'regptq.target_cpu': 'avx2'})
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    result = deploy(deploy_cfg, model_cfg, None, img, work_dir=tmp_path, model=model)
    assert saturating_weights(onnx.load(result.onnx_file)) == []
    assert any('(target CPU avx2)' in note and 'kept uint8' in note for note in result.notes)
    assert any(note.startswith('hint: ') and 'w_reduce_range=True' in note
               for note in result.notes)
