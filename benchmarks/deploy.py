"""Deployment benchmark: storage and CPU latency of FP32 / INT8 / INT4 detectors.

    nice -n 15 .venv/bin/python benchmarks/deploy.py [--models r50,retinanet,fcos,frcnn]
        [--runs 20] [--tvm-runs 20] [--size 512] [--threads 2] [--csv out.csv]

Models: ``r50`` = RetinaNet R50-FPN built from mmdet's own zoo config
(``mmdet::retinanet/retinanet_r50_fpn_1x_coco.py``, random init, ``init_cfg=None``: no
download); ``retinanet`` / ``fcos`` / ``frcnn`` = the bundled synthetic detectors (their
configs; the trained checkpoint when ``--checkpoints`` points at them, else random init —
size and speed do not depend on the weights). Quantized models are calibrated with MinMax
on random images (speed/size only; accuracy is ``tools/deploy.py --eval``).

Storage (bytes of the weights as stored; BatchNorm folded into the convs first):
- FP32: every parameter as float32 (also the size of a weights-only ``torch.save``);
- INT8: every Conv/Linear (first layer and prediction layers included) 8-bit codes, one
  byte each, + per-channel float32 scale and 8-bit zero point; the rest float32;
- INT4 (packed): 4-bit codes packed eight per int32 word (HAWQ), first layer 8 bit, every
  other Conv/Linear including the final prediction layers 4 bit, per-channel float32 scale
  and zero point stored in 4 bits; biases and the rest float32;
- INT4*: the same with the whole detection head (bbox/rpn/roi heads) kept FP32 (the paper's
  "INT4 with FP heads").

Latency: batch 1, ``size x size`` input, median of ``--runs`` timed runs after 3 warm-up
runs, the backends interleaved round by round (the CPU is shared: interleaving spreads the
load over all rows; ORT's worker threads do not spin between runs, which with several
sessions in one process made every ORT row slower at 2 threads). Rows: FP32 ONNX Runtime,
INT8 ONNX Runtime (W8A8: per-channel
symmetric int8 weights, uint8 activations, the ``ort_int8`` rewrite), FP32 TVM
(``tvm_relax``), INT4 TVM (``tvm_int4``: W4A4, integer convs, packed weights). TVM runs
our fixed schedules (``deploy/tvm/schedule.py``) and, on an AVX-512 VNNI CPU, the int8
convolution kernel of ``deploy/tvm/vnni.py``; there is no MetaSchedule tuning database.
A two-stage detector (``frcnn``) is two graphs per row (``deploy/detectors/two_stage.py``):
its time is graph 1 + mmdet's RPN decoding, NMS and RoIAlign on the host + graph 2 on
``test_cfg.rpn.max_per_img`` RoIs + the box decoding, as its deployed backend model runs;
its ``graph 1 only`` rows time the first graph alone (speed-up against FP32 ORT's graph 1).

``--end2end`` times the end-to-end deployments instead (image → ``dets`` + ``labels``:
decoding, score threshold, top-k and NMS included; Faster R-CNN as ONE graph with RoIAlign)
on a synthetic val image resized to ``size``: FP32 ORT, INT8 ORT (one graph each) and INT4
TVM + the NumPy post-processor (Faster R-CNN: two TVM artifacts with the NumPy RPN
proposals, RoIAlign and box decoding around them, ``deploy/runtime/two_stage.py``).

``--tvm-target-cpu host,haswell,haswell:generic`` builds one INT4 TVM row per entry (LLVM
CPU, optionally ``:KERNEL`` = ``vnni`` / ``avx2`` / ``generic``): e.g. the AVX2 kernel and
the generic schedule next to the host's VNNI kernel, on this CPU.
``--w-reduce-range`` quantizes the INT8 ORT rows with ``w_reduce_range=True`` (8-bit weights
within ``-64..64``), the layout whose u8 x s8 kernel is exact and fast on x86 CPUs without
VNNI. Run under ``deploy/onnx/avx2_shim.py``'s ``LD_PRELOAD`` library, every ORT row takes
ORT's AVX2 kernels on this core (docs/deploy.md, "CPUs without AVX-512 VNNI").

``--ort-profile RUNS`` then explains the ORT rows: ORT's own profiler over RUNS runs of each
ORT graph (``deploy/onnx/ort_profile.py``), printing kernel time per op type and the slowest
nodes; every node's time goes to ``<work-dir>/<graph>_ort_nodes.csv``.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmdet_regptq.bench.models import W4A4, W8A8, model_config
from mmdet_regptq.bench.timing import time_interleaved
from mmdet_regptq.table import Table

HEAD_SCOPES = ('bbox_head', 'rpn_head', 'roi_head')
#: suffix of a two-stage detector's rows that time its first graph alone
GRAPH1 = 'graph 1 only'

# ----------------------------------------------------------------------------- storage
def storage_bytes(model: torch.nn.Module, bits_of: Callable[[str], int | None]) -> int:
    """Bytes of the folded model's weights with Conv/Linear weights at ``bits_of(name)``
    bits (None = float32); everything else float32."""
    from mmdet_regptq.quant import find_quantizable, packed_numel

    total = 0
    quantized = set()
    for name, module in find_quantizable(model):
        weight = module.weight
        bits = bits_of(name)
        if bits is None:
            continue
        quantized.add(id(weight))
        c_out = weight.shape[0]
        total += packed_numel(weight.numel(), bits) * 4 if bits < 8 else weight.numel()
        total += c_out * 4                                    # float32 scale
        total += math.ceil(c_out * bits / 8)                  # zero point in `bits`
    for p in model.parameters():
        if id(p) not in quantized:
            total += p.numel() * 4
    return total


def folded_float(cfg: Any, checkpoint: str | None) -> torch.nn.Module:
    """The float detector with its BatchNorms folded (what every format stores)."""
    from mmdet_regptq.deploy import build_detector
    from mmdet_regptq.quant import fold_bn

    model = build_detector(cfg, checkpoint)
    x = torch.zeros(1, 3, 64, 64)
    fold_bn(model, lambda m: m._forward(x) if not hasattr(m, 'roi_head') else m.extract_feat(x))
    return model


def storage_rows(name: str, cfg: Any, checkpoint: str | None) -> list[dict]:
    model = folded_float(cfg, checkpoint)
    from mmdet_regptq.quant import find_quantizable

    layers = [n for n, _ in find_quantizable(model)]
    first = _first_layer(model, layers)
    def in_head(n: str) -> bool:
        return n.split('.')[0] in HEAD_SCOPES

    fp32 = storage_bytes(model, lambda n: None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'fp32.pth'
        torch.save(build_float_state(cfg, checkpoint), path)
        file_bytes = path.stat().st_size

    def int4(n: str) -> int:
        return 8 if n == first else 4

    for fmt, fn in (('FP32', lambda n: None), ('INT8', lambda n: 8), ('INT4 packed', int4),
                    ('INT4* (FP heads)', lambda n: None if in_head(n) else int4(n))):
        b = storage_bytes(model, fn)
        rows.append(dict(model=name, format=fmt, MB=round(b / 2**20, 2),
                         ratio=round(fp32 / b, 2)))
    rows[0]['file_MB'] = round(file_bytes / 2**20, 2)
    return rows


def build_float_state(cfg: Any, checkpoint: str | None) -> dict:
    from mmdet_regptq.deploy import build_detector
    return {k: v for k, v in build_detector(cfg, checkpoint).state_dict().items()}


def _first_layer(model: torch.nn.Module, layers: list[str]) -> str:
    """The first Conv to run (the stem), as the policy's 'auto' finds it."""
    stems = [n for n in layers if n.startswith('backbone.')]
    return stems[0] if stems else layers[0]


# ----------------------------------------------------------------------------- latency
Graph = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def _ort_graph(path: Path) -> Graph:
    import onnxruntime as ort

    from mmdet_regptq.deploy.onnx.session import ort_session_options

    # idle ORT workers do not spin: with several sessions interleaved (and a two-stage
    # detector's PyTorch host steps) they took the cores from each other: FCOS FP32 at 2
    # threads measured 110 ms spinning, 71 ms not
    options = ort_session_options(torch.get_num_threads())
    sess = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    return lambda feeds: sess.run(None, feeds)


def _tvm_graph(directory: Path) -> Graph:
    from mmdet_regptq.deploy.tvm.runner import TvmRunner

    runner = TvmRunner(directory)
    return lambda feeds: list(runner(feeds).values())


def tvm_int4_builds(spec: str) -> list[tuple[str, str | None, str]]:
    """``--tvm-target-cpu``: ``MCPU[:KERNEL],...`` → ``(row label, mcpu, int8 kernel)``.

    ``host`` = this machine's CPU; any LLVM CPU name (``haswell`` = any AVX2 CPU) builds
    for that CPU (the code must run here, so it can only be this CPU or an older one);
    ``KERNEL`` (``auto`` / ``vnni`` / ``avx2`` / ``generic``) forces the int8 kernel. The
    default single ``host`` build is the row ``INT4 TVM``."""
    from tvm.target import codegen

    from mmdet_regptq.deploy.tvm.vnni import INT8_KERNELS

    builds = []
    for item in spec.split(','):
        mcpu, _, kernel = item.strip().partition(':')
        kernel = kernel or 'auto'
        if not mcpu or kernel not in INT8_KERNELS:
            raise SystemExit(f'--tvm-target-cpu: {item!r}; expected MCPU[:KERNEL] with KERNEL '
                             f'one of {", ".join(INT8_KERNELS)}')
        builds.append((mcpu, kernel))
    if builds == [('host', 'auto')]:
        return [('INT4 TVM', None, 'auto')]
    host = str(codegen.llvm_get_system_cpu())
    return [(f'INT4 TVM {host if mcpu == "host" else mcpu}'
             + (f' {kernel}' if kernel != 'auto' else ''), None if mcpu == 'host' else mcpu,
             kernel) for mcpu, kernel in builds]


def tvm_int4_variants(onnx_file: Path, work: Path, name: str, builds: list, post: Callable
                      ) -> dict[str, Callable[[np.ndarray], Any]]:
    """One INT4 TVM row per build of ``tvm_int4_builds``; ``post`` maps the raw outputs."""
    import onnx

    from mmdet_regptq.deploy.tvm.build import build_artifact, host_target
    from mmdet_regptq.deploy.tvm.runner import TvmRunner

    runs = {}
    for label, mcpu, kernel in builds:
        out = work / (f'{name}_tvm_int4' + label[len('INT4 TVM'):].replace(' ', '_'))
        _, report = build_artifact(onnx.load(str(onnx_file)), out, integer=True,
                                   target=host_target(mcpu), kernel=kernel)
        kernels = Counter(json.loads((out / 'meta.json').read_text()).get('kernels', {})
                          .values())
        logging.info('%s %s: %s; kernels %s', name, label, report.summary(), dict(kernels))
        runs[label] = functools.partial(lambda r, feed: post(r({'input': feed})),
                                        TvmRunner(out))
    return runs


def _static_meta(size: int) -> dict:
    """The image meta of a ``size`` x ``size`` input fed as is (no resize, no padding)."""
    return dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                scale_factor=(1.0, 1.0), batch_input_shape=(size, size))


def export_two_stage_onnx(model: torch.nn.Module, x: torch.Tensor, num_rois: int,
                          stem: Path, int4: bool) -> tuple[Path, Path, list]:
    """Graph 1 (features + RPN outputs) and graph 2 (the box head on ``num_rois`` RoIs) of a
    two-stage detector as ``STEM.onnx`` / ``STEM_roi.onnx`` (opset 21 with INT4 weights,
    else 17); returns the two paths and a calibration feed of each."""
    from mmdet_regptq.deploy import export_onnx
    from mmdet_regptq.deploy.detectors.two_stage import (ROI_INPUT, RoIStage, RpnStage,
                                                         TwoStageHost)

    size = x.shape[-1]
    stage1 = RpnStage(model).eval()
    names = stage1.output_names(x)
    roi_x = TwoStageHost(model, num_rois).sample_roi_features(stage1, x, [_static_meta(size)])
    paths = stem.with_name(f'{stem.name}.onnx'), stem.with_name(f'{stem.name}_roi.onnx')
    opset = 21 if int4 else 17
    export_onnx(stage1, x, paths[0], output_names=names, int4_weights=int4, opset=opset)
    export_onnx(RoIStage(model).eval(), roi_x, paths[1], input_names=[ROI_INPUT],
                output_names=RoIStage.output_names, int4_weights=int4, opset=opset)
    return paths[0], paths[1], [{'input': x.numpy()}, {ROI_INPUT: roi_x.numpy()}]


def two_stage_variants(name: str, cfg: Any, checkpoint: str | None, size: int, work: Path,
                       tvm: bool, w8a8: dict | None = None
                       ) -> dict[str, Callable[[np.ndarray], Any]]:
    """The four deployments of a two-stage detector, each as graph 1 → host → graph 2."""
    import onnx
    from mmdet.structures import DetDataSample

    from mmdet_regptq.deploy import build_detector, make_ort_int8, quantize_for_deploy
    from mmdet_regptq.deploy.tvm.build import build_artifact
    from mmdet_regptq.deploy.detectors.two_stage import (ROI_INPUT, RpnStage, TwoStageHost,
                                                         num_rois_of)

    x = torch.randn(1, 3, size, size)
    meta = _static_meta(size)
    num_rois = num_rois_of(cfg)

    def export_pair(model: torch.nn.Module, tag: str, int4: bool) -> tuple[Path, Path, list]:
        return export_two_stage_onnx(model, x, num_rois, work / f'{name}_{tag}', int4)

    def pipeline(host: TwoStageHost, names: list[str], graph1: Graph, graph2: Graph
                 ) -> Callable[[np.ndarray], Any]:
        def roi_graph(feats: torch.Tensor) -> list[torch.Tensor]:
            return [torch.from_numpy(o) for o in graph2({ROI_INPUT: feats.numpy()})]

        def run(feed: np.ndarray) -> Any:
            outs = dict(zip(names, (torch.from_numpy(o) for o in graph1({'input': feed}))))
            return host.predict(outs, roi_graph, [DetDataSample(metainfo=meta)],
                                rescale=False)
        run.graph1 = lambda feed: graph1({'input': feed})
        return run

    fp = build_detector(cfg, checkpoint)
    names = RpnStage(fp).output_names(x)
    host = TwoStageHost(build_detector(cfg, checkpoint), num_rois)
    fp1, fp2, _ = export_pair(fp, 'fp32', int4=False)
    runs = {'FP32 ORT': pipeline(host, names, _ort_graph(fp1), _ort_graph(fp2))}
    q8 = build_detector(cfg, checkpoint)
    quantize_for_deploy(q8, quant=w8a8 or W8A8, method=dict(type='MinMax'),
                        input_shape=(size, size))
    q1, q2, feeds = export_pair(q8, 'w8a8', int4=False)
    for path, feed in zip((q1, q2), feeds):
        fused, report = make_ort_int8(onnx.load(str(path)), [feed])
        logging.info('%s INT8 ORT %s: %s', name, path.name, report.summary())
        onnx.save(fused, str(path))
    runs['INT8 ORT'] = pipeline(host, names, _ort_graph(q1), _ort_graph(q2))
    if tvm:
        dirs = [work / f'{p.stem}_tvm' for p in (fp1, fp2)]
        for path, out in zip((fp1, fp2), dirs):
            build_artifact(onnx.load(str(path)), out, integer=False)
        runs['FP32 TVM'] = pipeline(host, names, *(_tvm_graph(d) for d in dirs))
        q4 = build_detector(cfg, checkpoint)
        quantize_for_deploy(q4, quant=W4A4, method=dict(type='MinMax'),
                            input_shape=(size, size))
        paths = export_pair(q4, 'w4a4', int4=True)[:2]
        dirs = [work / f'{p.stem}_tvm' for p in paths]
        for path, out in zip(paths, dirs):
            _, report = build_artifact(onnx.load(str(path)), out, integer=True)
            logging.info('%s INT4 TVM %s: %s', name, path.name, report.summary())
        runs['INT4 TVM'] = pipeline(host, names, *(_tvm_graph(d) for d in dirs))
    # graph 1 alone too: the host steps cost every backend the same
    runs.update({f'{key} {GRAPH1}': run.graph1 for key, run in list(runs.items())})
    return runs


def export_variants(name: str, cfg: Any, checkpoint: str | None, size: int, work: Path,
                    tvm: bool, tvm_builds: list | None = None, w8a8: dict | None = None
                    ) -> dict[str, Callable[[np.ndarray], Any]]:
    """Build the four deployments of one detector; returns row name → run(input)."""
    import onnx

    from mmdet_regptq.deploy import (RawDetector, build_detector, export_onnx, make_ort_int8,
                                     quantize_for_deploy, raw_output_names)
    from mmdet_regptq.deploy.tvm.build import build_artifact
    from mmdet_regptq.deploy.tvm.runner import TvmRunner

    x = torch.randn(1, 3, size, size)
    runs: dict[str, Callable[[np.ndarray], Any]] = {}

    def ort_session(path: Path) -> Callable:
        graph = _ort_graph(path)
        return lambda feed: graph({'input': feed})

    fp = build_detector(cfg, checkpoint)
    names = raw_output_names(fp, x)
    export_onnx(RawDetector(fp), x, work / f'{name}_fp32.onnx', output_names=names, opset=17)
    runs['FP32 ORT'] = ort_session(work / f'{name}_fp32.onnx')

    q8 = build_detector(cfg, checkpoint)
    quantize_for_deploy(q8, quant=w8a8 or W8A8, method=dict(type='MinMax'),
                        input_shape=(size, size))
    export_onnx(RawDetector(q8), x, work / f'{name}_w8a8.onnx', output_names=names,
                int4_weights=False, opset=17)
    fused, report = make_ort_int8(onnx.load(str(work / f'{name}_w8a8.onnx')),
                                  [{'input': x.numpy()}])
    logging.info('%s INT8 ORT: %s', name, report.summary())
    onnx.save(fused, str(work / f'{name}_w8a8_ort.onnx'))
    runs['INT8 ORT'] = ort_session(work / f'{name}_w8a8_ort.onnx')

    if tvm:
        build_artifact(onnx.load(str(work / f'{name}_fp32.onnx')), work / f'{name}_tvm_fp32',
                       integer=False)
        fp32_tvm = TvmRunner(work / f'{name}_tvm_fp32')
        runs['FP32 TVM'] = lambda feed: fp32_tvm({'input': feed})
        q4 = build_detector(cfg, checkpoint)
        quantize_for_deploy(q4, quant=W4A4, method=dict(type='MinMax'),
                            input_shape=(size, size))
        export_onnx(RawDetector(q4), x, work / f'{name}_w4a4.onnx', output_names=names)
        runs.update(tvm_int4_variants(work / f'{name}_w4a4.onnx', work, name,
                                      tvm_builds or tvm_int4_builds('host'), lambda out: out))
    return runs


def end2end_variants(name: str, cfg: Any, checkpoint: str | None, size: int, work: Path,
                     tvm: bool, tvm_builds: list | None = None, w8a8: dict | None = None
                     ) -> dict[str, Callable[[np.ndarray], Any]]:
    """The end-to-end deployments (image -> dets + labels, ``deploy/detectors/end2end.py``):
    FP32 ORT and INT8 ORT as one graph each, INT4 TVM as the raw-output artifact(s) + the
    NumPy post-processor, as ``python -m mmdet_regptq.deploy.run`` runs them."""
    import onnx

    from mmdet_regptq.deploy import (RawDetector, build_detector, export_onnx, make_ort_int8,
                                     quantize_for_deploy, raw_output_names)
    from mmdet_regptq.deploy.detectors.spec import dense_postprocess_spec
    from mmdet_regptq.deploy.detectors.two_stage import is_two_stage
    from mmdet_regptq.deploy.mmdeploy.end2end import end2end_graph
    from mmdet_regptq.deploy.runtime.postprocess import DensePostProcessor

    x = torch.from_numpy(image_feed(cfg, size))
    outputs = dict(output_names=['dets', 'labels'],
                   dynamic_axes={'dets': {1: 'n'}, 'labels': {1: 'n'}})

    def ort_session(path: Path) -> Callable:
        graph = _ort_graph(path)
        return lambda feed: graph({'input': feed})

    fp = build_detector(cfg, checkpoint)
    export_onnx(end2end_graph(fp, (size, size)), x, work / f'{name}_e2e_fp32.onnx', opset=17,
                **outputs)
    runs = {'FP32 ORT': ort_session(work / f'{name}_e2e_fp32.onnx')}
    q8 = build_detector(cfg, checkpoint)
    quantize_for_deploy(q8, quant=w8a8 or W8A8, method=dict(type='MinMax'),
                        input_shape=(size, size))
    export_onnx(end2end_graph(q8, (size, size)), x, work / f'{name}_e2e_w8a8.onnx',
                int4_weights=False, opset=17, **outputs)
    fused, report = make_ort_int8(onnx.load(str(work / f'{name}_e2e_w8a8.onnx')),
                                  [{'input': x.numpy()}])
    logging.info('%s INT8 ORT end to end: %s', name, report.summary())
    onnx.save(fused, str(work / f'{name}_e2e_w8a8_ort.onnx'))
    runs['INT8 ORT'] = ort_session(work / f'{name}_e2e_w8a8_ort.onnx')
    if tvm and is_two_stage(cfg.model):
        runs.update(two_stage_tvm_int4_variants(name, cfg, checkpoint, size, work, x,
                                                tvm_builds or tvm_int4_builds('host')))
    elif tvm:
        q4 = build_detector(cfg, checkpoint)
        quantize_for_deploy(q4, quant=W4A4, method=dict(type='MinMax'),
                            input_shape=(size, size))
        export_onnx(RawDetector(q4), x, work / f'{name}_w4a4.onnx',
                    output_names=raw_output_names(q4, x))
        post = DensePostProcessor(*dense_postprocess_spec(q4, (size, size)))
        runs.update(tvm_int4_variants(work / f'{name}_w4a4.onnx', work, name,
                                      tvm_builds or tvm_int4_builds('host'), post))
    return runs


def two_stage_tvm_int4_variants(name: str, cfg: Any, checkpoint: str | None, size: int,
                                work: Path, x: torch.Tensor, builds: list
                                ) -> dict[str, Callable[[np.ndarray], Any]]:
    """INT4 TVM end to end of a two-stage detector, as the torch-free runtime runs it: the
    W4A4 artifacts of graph 1 (features + RPN outputs) and graph 2 (the box head on
    ``test_cfg.rpn.max_per_img`` RoIs) with the NumPy RPN proposals, RoIAlign and box
    decoding + NMS of ``deploy/runtime/two_stage.py``; one row per build."""
    import onnx

    from mmdet_regptq.deploy import build_detector, quantize_for_deploy
    from mmdet_regptq.deploy.detectors.spec import two_stage_postprocess_spec
    from mmdet_regptq.deploy.detectors.two_stage import num_rois_of
    from mmdet_regptq.deploy.runtime.two_stage import TwoStagePipeline, TwoStagePostProcessor
    from mmdet_regptq.deploy.tvm.build import build_artifact, host_target
    from mmdet_regptq.deploy.tvm.runner import TvmRunner

    q4 = build_detector(cfg, checkpoint)
    quantize_for_deploy(q4, quant=W4A4, method=dict(type='MinMax'), input_shape=(size, size))
    num_rois = num_rois_of(cfg)
    paths = export_two_stage_onnx(q4, x, num_rois, work / f'{name}_e2e_w4a4', int4=True)[:2]
    post = TwoStagePostProcessor(*two_stage_postprocess_spec(q4, (size, size), num_rois))
    runs = {}
    for label, mcpu, kernel in builds:
        dirs = [work / (f'{p.stem}_tvm_int4' + label[len('INT4 TVM'):].replace(' ', '_'))
                for p in paths]
        for path, out in zip(paths, dirs):
            _, report = build_artifact(onnx.load(str(path)), out, integer=True,
                                       target=host_target(mcpu), kernel=kernel)
            logging.info('%s %s %s: %s', name, label, path.name, report.summary())
        runs[label] = TwoStagePipeline(post, *(TvmRunner(d) for d in dirs))
    return runs


def image_feed(cfg: Any, size: int) -> np.ndarray:
    """A synthetic val image resized to ``size`` and normalized as the model's data
    preprocessor does (a real image: post-processing time depends on the detections)."""
    import cv2

    img = cv2.imread(str(Path(__file__).resolve().parents[1] / 'data/synthetic/val/000003.jpg'))
    if img is None:
        raise FileNotFoundError('data/synthetic/val/000003.jpg: run '
                                'python -m mmdet_regptq.datasets.synthetic first')
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    pre = cfg.model.data_preprocessor
    chw = img.transpose(2, 0, 1).astype(np.float32)
    chw = chw[::-1] if pre.get('bgr_to_rgb') else chw
    mean = np.asarray(pre.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray(((chw - mean) / std)[None])


def latency_rows(name: str, cfg: Any, checkpoint: str | None, args: argparse.Namespace,
                 work: Path) -> list[dict]:
    from mmdet_regptq.deploy.detectors.two_stage import is_two_stage

    variants = two_stage_variants if is_two_stage(cfg.model) else export_variants
    if args.end2end:
        variants = end2end_variants
    extra = dict(w8a8=dict(W8A8, w_reduce_range=True) if args.w_reduce_range else W8A8)
    if variants is not two_stage_variants:
        extra['tvm_builds'] = tvm_int4_builds(args.tvm_target_cpu)
    runs = variants(name, cfg, checkpoint, args.size, work, tvm=not args.skip_tvm, **extra)
    feed = (image_feed(cfg, args.size) if args.end2end else np.random.default_rng(0)
            .standard_normal((1, 3, args.size, args.size)).astype(np.float32))
    n = {k: (args.tvm_runs if 'TVM' in k else args.runs) for k in runs}
    times = time_interleaved({k: functools.partial(fn, feed) for k, fn in runs.items()}, n,
                             warmup=1 if args.tvm_runs < 3 else 3)
    rows = []
    for key, ts in times.items():
        med = statistics.median(ts)
        base = statistics.median(times['FP32 ORT' + (f' {GRAPH1}' if GRAPH1 in key else '')])
        rows.append(dict(model=name, backend=key, ms=round(med * 1e3, 1), runs=len(ts),
                         speedup_vs_fp32_ort=round(base / med, 2)))
    return rows


def ort_graph_files(name: str, work: Path, two_stage: bool, end2end: bool = False
                    ) -> dict[str, Path]:
    """The ONNX Runtime graphs :func:`latency_rows` wrote for ``name``: label → file."""
    if end2end:
        return {'FP32 ORT': work / f'{name}_e2e_fp32.onnx',
                'INT8 ORT': work / f'{name}_e2e_w8a8_ort.onnx'}
    if two_stage:
        return {'FP32 ORT graph 1': work / f'{name}_fp32.onnx',
                'FP32 ORT RoI graph': work / f'{name}_fp32_roi.onnx',
                'INT8 ORT graph 1': work / f'{name}_w8a8.onnx',
                'INT8 ORT RoI graph': work / f'{name}_w8a8_roi.onnx'}
    return {'FP32 ORT': work / f'{name}_fp32.onnx', 'INT8 ORT': work / f'{name}_w8a8_ort.onnx'}


def ort_profile_rows(name: str, cfg: Any, args: argparse.Namespace, work: Path,
                     top: int = 8) -> list[dict]:
    """ORT's per-kernel profile of each ORT graph of ``name``: prints the op types and the
    slowest nodes; returns one row per op type (all nodes go to a CSV in the work dir)."""
    from mmdet_regptq.deploy.onnx.ort_profile import profile_ort
    from mmdet_regptq.deploy.detectors.two_stage import is_two_stage

    rows = []
    files = ort_graph_files(name, work, is_two_stage(cfg.model), args.end2end)
    feeds = {'input': image_feed(cfg, args.size)} if args.end2end else None
    for label, path in files.items():
        prof = profile_ort(path, feeds, runs=args.ort_profile, threads=args.threads)
        ops = [dict(model=name, graph=label, **r) for r in prof.op_types]
        print_table(ops, f'ORT profile: {name} {label} ({path.name}), kernels '
                         f'{prof.total_ms:.1f} ms/run, {prof.runs} runs, {args.threads} threads')
        print_table(prof.nodes[:top], f'slowest {top} nodes: {name} {label}')
        Table(['node', 'op_type', 'ms', 'share'], prof.nodes).to_csv(
            work / f'{path.stem}_ort_nodes.csv')
        rows += ops
    return rows


def print_table(rows: list[dict], title: str) -> None:
    if rows:
        print('\n' + Table.from_rows(rows, title=title).format())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default='r50,retinanet,fcos,frcnn')
    parser.add_argument('--latency-models', default=None,
                        help='models to time (default: --models)')
    parser.add_argument('--checkpoints', nargs='*', default=[],
                        help='name=path of trained checkpoints of the bundled detectors')
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--runs', type=int, default=20)
    parser.add_argument('--tvm-runs', type=int, default=20)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--skip-tvm', action='store_true')
    parser.add_argument('--tvm-target-cpu', default='host', metavar='MCPU[:KERNEL],...',
                        help='INT4 TVM builds, one row each: the LLVM CPU to compile for '
                             '(host, or e.g. haswell = AVX2 without VNNI) and optionally the '
                             'int8 kernel (auto, vnni, avx2, generic); dense detectors, and '
                             'every detector with --end2end')
    parser.add_argument('--w-reduce-range', action='store_true',
                        help='INT8 ORT rows with 8-bit weights within -64..64 '
                             "(quant.w_reduce_range: exact on ORT's AVX2 u8 x s8 kernel)")
    parser.add_argument('--skip-latency', action='store_true')
    parser.add_argument('--end2end', action='store_true',
                        help='time the end-to-end deployments (image -> dets + labels, '
                             'decoding and NMS included) on a synthetic val image')
    parser.add_argument('--ort-profile', type=int, default=0, metavar='RUNS',
                        help='after the latency runs, profile each ORT graph over RUNS runs '
                             "with ORT's profiler: time per op type and per node (0: off)")
    parser.add_argument('--work-dir', default='work_dirs/benchmark_deploy')
    parser.add_argument('--csv', default='work_dirs/benchmark_deploy/deploy.csv')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    import mmdet_regptq  # noqa: F401
    import mmdet_regptq.deploy  # noqa: F401

    torch.set_num_threads(args.threads)
    os.environ['TVM_NUM_THREADS'] = str(args.threads)   # read when TVM's pool first runs
    checkpoints = dict(c.split('=', 1) for c in args.checkpoints)
    models = args.models.split(',')
    timed = args.latency_models.split(',') if args.latency_models else models
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    storage, latency, profile = [], [], []
    for name in models:
        cfg = model_config(name)
        storage += storage_rows(name, cfg, checkpoints.get(name))
        print_table([r for r in storage if r['model'] == name], f'storage: {name}')
    for name in ([] if args.skip_latency else timed):
        cfg = model_config(name)
        rows = latency_rows(name, cfg, checkpoints.get(name), args, work)
        latency += rows
        print_table(rows, f'latency: {name}, 1x3x{args.size}x{args.size}, '
                          f'{args.threads} threads')
        if args.ort_profile:
            profile += ort_profile_rows(name, cfg, args, work)
    print_table(storage, 'storage (MB of weights as stored; ratio = FP32 / format)')
    print_table(latency, f'latency (ms, median; batch 1, {args.size}x{args.size}, '
                         f'{args.threads} threads{", end to end" if args.end2end else ""})')
    table = Table(['table', 'model', 'format_or_backend', 'MB_or_ms', 'ratio_or_speedup',
                   'runs'])
    for r in storage:
        table.add(table='storage', model=r['model'], format_or_backend=r['format'],
                  MB_or_ms=r['MB'], ratio_or_speedup=r['ratio'])
    for r in latency:
        table.add(table='latency', model=r['model'], format_or_backend=r['backend'],
                  MB_or_ms=r['ms'], ratio_or_speedup=r['speedup_vs_fp32_ort'], runs=r['runs'])
    for r in profile:   # ms per run of one op type; ratio = its share of the kernels
        table.add(table=f"ort_profile {r['graph']}", model=r['model'],
                  format_or_backend=r['op_type'], MB_or_ms=r['ms'], ratio_or_speedup=r['share'],
                  runs=args.ort_profile)
    table.to_csv(args.csv)
    print(f'\nCSV: {args.csv}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
