"""Deployed AP vs fake-quant AP of the bundled detectors (and the real YOLOv5n).

    python benchmarks/deploy_accuracy.py [--detectors retinanet fcos faster-rcnn yolov5n]
        [--method QDrop]
        (--method: a name, or LABEL=NAME{json options} as in benchmarks/accuracy.py)
        [--iters 100] [--num-images 32] [--val-images 100]
        [--backends tvm-int4 onnxruntime-int8 onnxruntime] [--tvm-bits w4a4 [w4a8]]
        [--symmetric-int8-weights] [--latency-runs 0] [--latency-only] [--threads 1]
        [--ort-profile 0]

Each backend gets the model it is for: ``tvm-int4`` a W4A4 model, ``onnxruntime-int8`` a
W8A8 one. Per detector and bit width: calibrate with ``RegPTQHook`` (train images, the
given method) and test the fake-quant model with mmdet's Runner + CocoMetric on the first
``--val-images`` val images, saving ``quantized.pth``; then deploy that checkpoint with the
backend's deploy config (``deploy_configs/detection_<backend>_static-192x192.py``: export →
``to_backend`` → mmdeploy's ``build_test_runner``) and test it on the same images (batch 1:
the deployed graphs are static). Prints the table (AP on the 0–100 scale, deployed −
fake-quant) and writes it as CSV. Faster R-CNN deploys as two graphs with mmdet's RPN
decoding, NMS and RoIAlign on the host between them (``deploy/detectors/two_stage.py``).
``--end2end`` deploys with the ``*_end2end_static-192x192.py`` configs instead: one
artifact per detector with decoding and NMS inside (Faster R-CNN: one ORT graph with
RoIAlign; on ``tvm-int4`` two integer artifacts with the NumPy RPN proposals, RoIAlign and
box decoding of ``deploy/runtime/two_stage.py`` around them), evaluated by mmdeploy's own
``End2EndModel``.
``onnxruntime`` (not a default) deploys the float checkpoint (FP32; "fake-quant" = FP);
``tvm-fp32`` (real detectors) the same to TVM with this package's schedules, no integers.

``--detectors yolov5n``: the official Ultralytics YOLOv5n (``yolov5n/yolov5n.pt`` in the
real-data folder, ``../shared/realdata`` beside the checkout or ``$REGPTQ_REALDATA``,
converted once into ``--out``), calibrated on ``--num-images`` of the 128 COCO train
images and evaluated on all 64 COCO val images of ``configs/yolov5/yolov5_n_coco128.py``
(``--val-images`` does not apply). It always deploys end to end at 640x640
(``*_end2end_static-640x640.py``; the ORT INT8 output ranges are measured on train
images) and the deployed AP is that of the torch-free runtime
(``mmdet_regptq.deploy.runtime.Detector``, what ``python -m mmdet_regptq.deploy.run``
runs: letterbox onto the 640x640 canvas, the artifact, boxes back to the image) scored by
mmdet's ``CocoMetric``. The fake-quant model is tested twice: with the config's test
pipeline (letterbox padded to a multiple of 32, as ``mim run mmdet test``) and with the
deployed graph's input (the letterbox padded to 640x640), so the backend's own error
(``delta``) is told apart from the input shape's (``fake_quant_AP_640``).
``--latency-runs N`` then times the artifacts side by side (``--latency-only``: those an
earlier run left in ``--out``): the runtime's letterboxed tensor -> detections, interleaved,
``--threads`` threads (ONNX Runtime and TVM), speed-up against the FP32 ORT artifact;
``--ort-profile RUNS`` adds ORT's kernel time per op type of each ORT artifact.
"""
from __future__ import annotations

import argparse
import copy
import functools
import logging
import os
from pathlib import Path

from mmdet_regptq.bench.metrics import bbox_metrics
from mmdet_regptq.bench.models import REAL_DETECTORS, real_checkpoint
from mmdet_regptq.bench.models import REPO_ROOT as ROOT
from mmdet_regptq.bench.models import SYNTHETIC_DETECTORS as DETECTORS
from mmdet_regptq.bench.specs import parse_bits, parse_method
from mmdet_regptq.table import Table

#: backend -> (deploy config, the bit width of the model it deploys)
BACKENDS = {'tvm-int4': ('detection_tvm-int4_static-192x192.py', 'w4a4'),
            'onnxruntime-int8': ('detection_onnxruntime-int8_static-192x192.py', 'w8a8'),
            'onnxruntime': ('detection_onnxruntime_static-192x192.py', 'fp32'),
            'tvm-fp32': (None, 'fp32')}   # real detectors only (END2END_640)
#: the same with ``--end2end``: one artifact, decoding and NMS inside (no torch at run time)
END2END = {'tvm-int4': 'detection_tvm-int4_end2end_static-192x192.py',
           'onnxruntime-int8': 'detection_onnxruntime-int8_end2end_static-192x192.py',
           'onnxruntime': 'detection_onnxruntime_end2end_static-192x192.py'}
END2END_640 = {name: cfg.replace('192x192', '640x640') for name, cfg in END2END.items()}
END2END_640['tvm-fp32'] = 'detection_tvm-fp32_end2end_static-640x640.py'   # real detectors


def model_config(detector: str, val_images: int, work: Path):
    """The bundled config with a val subset (CocoMetric scores every image of its file);
    a real detector's coco128 config (all 64 val images)."""
    from mmengine.config import Config

    from mmdet_regptq.datasets.subset import write_coco_subset

    if detector in REAL_DETECTORS:
        cfg = Config.fromfile(ROOT / REAL_DETECTORS[detector][0])
        for loader in ('train_dataloader', 'test_dataloader', 'val_dataloader'):
            cfg[loader].num_workers = 0
            cfg[loader].persistent_workers = False
        cfg.test_dataloader.batch_size = 1
        cfg.work_dir = str(work)
        return cfg
    cfg = Config.fromfile(ROOT / 'configs' / 'synthetic' / f'{DETECTORS[detector]}.py')
    cfg.test_dataloader.num_workers = 0
    cfg.test_dataloader.batch_size = 1        # the deployed graphs are static, batch 1
    cfg.test_dataloader.persistent_workers = False
    if val_images:
        ann = write_coco_subset(Path(cfg.test_evaluator.ann_file), val_images)
        cfg.test_dataloader.dataset.ann_file = str(ann)
        cfg.test_evaluator.ann_file = str(ann)
    cfg.work_dir = str(work)
    return cfg


def float_checkpoint(detector: str, args: argparse.Namespace) -> Path:
    if detector in REAL_DETECTORS:
        return real_checkpoint(detector, Path(args.out))
    return ROOT / 'checkpoints' / f'{DETECTORS[detector]}.pth'


def fake_quant(detector: str, bits: str, args: argparse.Namespace, work: Path
               ) -> tuple[float, Path]:
    """Calibrate + test the fake-quant model; returns (AP, quantized.pth); ``fp32``: the
    float model's AP and checkpoint."""
    from mmengine.runner import Runner

    cfg = model_config(detector, args.val_images, work)
    cfg.load_from = str(float_checkpoint(detector, args))
    if bits == 'fp32':
        cfg.custom_hooks = []
        metrics = Runner.from_cfg(cfg).test()
        return 100 * bbox_metrics(metrics)['bbox_mAP'], Path(cfg.load_from)
    cfg.custom_hooks = [quant_hook(bits, args)]
    metrics = Runner.from_cfg(cfg).test()
    return 100 * bbox_metrics(metrics)['bbox_mAP'], work / 'quantized.pth'


#: ``--symmetric-int8-weights``: 8-bit weights per output channel, symmetric (ONNX Runtime
#: stores them int8 and runs its u8 x s8 kernel; asymmetric 8-bit codes need uint8 weights
#: and its slower u8 x u8 kernel)
SYMMETRIC_WEIGHTS = dict(type='Uniform', per_channel=True, symmetric=True, scale_method='lp',
                         p=2.4)


def quant_hook(bits: str, args: argparse.Namespace, **kwargs) -> dict:
    """The ``RegPTQHook`` of this run (``kwargs``: e.g. a ``quantized_checkpoint``)."""
    w_bits, a_bits = parse_bits(bits)
    quant = dict(w_bits=w_bits, a_bits=a_bits)
    if args.symmetric_int8_weights and w_bits == 8:
        quant['weight'] = dict(SYMMETRIC_WEIGHTS)
    return dict(type='RegPTQHook', quant=quant,
                method=dict(type=args.method[1], iters=args.iters, **args.method[2]),
                calib=dict(num_images=args.num_images, batch_size=2, seed=args.seed),
                **kwargs)


def fake_quant_static(detector: str, bits: str, checkpoint: Path, args: argparse.Namespace,
                      work: Path, input_shape: tuple[int, int]) -> float:
    """AP of the same (fake-quant or float) model on the deployed graph's input: the
    letterbox padded to the static ``input_shape`` (``static_letterbox``)."""
    from mmengine.runner import Runner

    from mmdet_regptq.deploy.detectors.spec import static_letterbox

    cfg = static_letterbox(model_config(detector, args.val_images, work), input_shape)
    cfg.load_from = str(float_checkpoint(detector, args))
    cfg.custom_hooks = [] if bits == 'fp32' else [
        quant_hook(bits, args, quantized_checkpoint=str(checkpoint), save=False)]
    return 100 * bbox_metrics(Runner.from_cfg(cfg).test())['bbox_mAP']


def runtime_ap(work_dir: Path, cfg) -> float:
    """AP of the torch-free runtime (``deploy.runtime.Detector`` on each image file of the
    config's test set) with mmdet's ``CocoMetric``."""
    import torch
    from mmdet.datasets import CocoDataset
    from mmdet.evaluation import CocoMetric
    from pycocotools.coco import COCO

    from mmdet_regptq.deploy.runtime.detector import Detector

    dataset = cfg.test_dataloader.dataset
    ann_file = Path(dataset.data_root) / dataset.ann_file
    images = Path(dataset.data_root) / dataset.data_prefix['img']
    metric = CocoMetric(ann_file=str(ann_file), metric='bbox')
    metric.dataset_meta = CocoDataset.METAINFO
    detector = Detector(work_dir, threads=1)
    coco = COCO(str(ann_file))
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        found = detector(images / info['file_name'])
        metric.process({}, [dict(img_id=img_id, ori_shape=(info['height'], info['width']),
                                 pred_instances=dict(bboxes=torch.from_numpy(found.boxes),
                                                     scores=torch.from_numpy(found.scores),
                                                     labels=torch.from_numpy(found.labels)))])
    return 100 * metric.compute_metrics(metric.results)['bbox_mAP']


def deployed_real(detector: str, backend: str, checkpoint: Path, args: argparse.Namespace,
                  work: Path) -> float:
    """A real detector deployed end to end at 640x640, scored through the runtime. The
    deploy step's test set (the ORT INT8 output ranges, the export image) is the train
    split: no setting of the artifact comes from the val images."""
    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy

    cfg = model_config(detector, 0, work)
    deploy_cfg_model = copy.deepcopy(cfg)   # Config.copy() is shallow
    deploy_cfg_model.test_dataloader.dataset = cfg.train_dataloader.dataset.copy()
    deploy_cfg_model.test_dataloader.dataset.test_mode = True
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / f'{detector}_deploy.py'
    deploy_cfg_model.dump(str(cfg_path))
    train = cfg.train_dataloader.dataset
    img = str(sorted((Path(train.data_root) / train.data_prefix['img']).glob('*.jpg'))[0])
    deploy_cfg = str(ROOT / 'deploy_configs' / END2END_640[backend])
    result = deploy(deploy_cfg, str(cfg_path), str(checkpoint), img, work_dir=work)
    if not result.backend_files:
        raise RuntimeError(f'{backend}: no backend files ({result.notes})')
    print(f'  {detector} {backend}: ' + '; '.join(result.notes), flush=True)
    return runtime_ap(work, cfg)


def latency_rows(detector: str, work_dirs: dict[str, Path], args: argparse.Namespace
                 ) -> list[dict]:
    """Interleaved latency of the deployed artifacts (label -> work dir) through the
    runtime, on the first val image: ``Detector.run`` (the letterboxed tensor -> dets +
    labels: the ORT graph, or the TVM artifact + the NumPy post-processor) at
    ``--threads``; a TVM artifact's network and NumPy post-processing also apart; the
    letterbox itself (NumPy + OpenCV) is timed beside them."""
    import statistics
    import time

    from mmdet_regptq.bench.timing import time_interleaved
    from mmdet_regptq.deploy.runtime.detector import Detector

    dataset = model_config(detector, 0, Path(args.out)).test_dataloader.dataset
    image = sorted((Path(dataset.data_root) / dataset.data_prefix['img']).glob('*.jpg'))[0]
    detectors = {label: Detector(work, threads=args.threads) for label, work in work_dirs.items()}
    first = next(iter(detectors.values()))
    img = first.preprocess.load(str(image))
    tensor = first.prepare(img).tensor
    runs = {label: functools.partial(det.run, tensor) for label, det in detectors.items()}
    for label, work in work_dirs.items():    # tvm_int4: its two parts, timed apart too
        if detectors[label].spec['backend'] != 'onnxruntime':
            network, post = tvm_parts(work, detectors[label].spec)
            runs[f'{label} (network)'] = functools.partial(network, {'input': tensor})
            runs[f'{label} (post-processing)'] = functools.partial(post, network({'input': tensor}))
    times = time_interleaved(runs, args.latency_runs)
    pre = []
    for _ in range(args.latency_runs):
        start = time.perf_counter()
        first.prepare(img)
        pre.append(time.perf_counter() - start)
    if args.ort_profile:
        profile_ort_artifacts(work_dirs, tensor, args)
    base = next((statistics.median(ts) for label, ts in times.items()
                 if label.startswith('onnxruntime fp32')), None)
    rows = []
    for label, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(detector=detector, artifact=label, ms=round(med * 1e3, 1),
                         runs=len(ts), speedup_vs_fp32_ort=round(base / med, 2) if base else '',
                         letterbox_ms=round(statistics.median(pre) * 1e3, 1)))
    return rows


def tvm_parts(work: Path, spec: dict) -> tuple:
    """The TVM artifact's runner and its NumPy post-processor, as the runtime builds them."""
    import numpy as np

    from mmdet_regptq.deploy.runtime.postprocess import make_post_processor
    from mmdet_regptq.deploy.tvm.runner import TvmRunner

    stored = np.load(work / spec['priors'])
    return TvmRunner(work / spec['model']), make_post_processor(
        spec['postprocess'], [stored[f'priors{i}'] for i in range(len(stored.files))])


def profile_ort_artifacts(work_dirs: dict[str, Path], tensor, args: argparse.Namespace
                          ) -> None:
    """ORT's own profiler over ``--ort-profile`` runs of each ORT artifact: kernel time per
    op type (where the INT8 graph's time goes)."""
    import json

    from mmdet_regptq.deploy.onnx.ort_profile import profile_ort

    for label, work in work_dirs.items():
        spec = json.loads((work / 'spec.json').read_text())
        if spec['backend'] != 'onnxruntime':
            continue
        prof = profile_ort(work / spec['model'], {'input': tensor}, runs=args.ort_profile,
                           threads=args.threads)
        rows = [dict(artifact=label, **r) for r in prof.op_types[:12]]
        print('\n' + Table.from_rows(rows, title=f'ORT profile: {label}, kernels '
                                                 f'{prof.total_ms:.1f} ms/run').format())


def deployed(detector: str, backend: str, checkpoint: Path, args: argparse.Namespace,
             work: Path) -> float:
    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy, evaluate

    if detector in REAL_DETECTORS:
        return deployed_real(detector, backend, checkpoint, args, work)
    cfg = model_config(detector, args.val_images, work)
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / f'{DETECTORS[detector]}_subset.py'
    cfg.dump(str(cfg_path))
    name = END2END[backend] if args.end2end else BACKENDS[backend][0]
    deploy_cfg = str(ROOT / 'deploy_configs' / name)
    img = str(ROOT / 'data' / 'synthetic' / 'val' / '000000.jpg')
    result = deploy(deploy_cfg, str(cfg_path), str(checkpoint), img, work_dir=work)
    if not result.backend_files:
        raise RuntimeError(f'{backend}: no backend files ({result.notes})')
    metrics = evaluate(deploy_cfg, str(cfg_path), result.backend_files, work_dir=work)
    return 100 * bbox_metrics(metrics)['bbox_mAP']


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--detectors', nargs='+', default=list(DETECTORS),
                        choices=list(DETECTORS) + list(REAL_DETECTORS))
    parser.add_argument('--method', default='QDrop', type=parse_method,
                        help='a method name or LABEL=NAME{json options}, e.g. '
                             '\'RegPTQ-p2=RegPTQ{"llaq": {"quantizer": {"power_of_two": '
                             'true}}}\'')
    parser.add_argument('--iters', type=int, default=100)
    parser.add_argument('--num-images', type=int, default=32)
    parser.add_argument('--val-images', type=int, default=100, help='0 = the whole val split')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--backends', nargs='+', default=['tvm-int4', 'onnxruntime-int8'],
                        choices=list(BACKENDS))
    parser.add_argument('--tvm-bits', nargs='+', default=['w4a4'],
                        help='bit width(s) of the tvm-int4 model (4-bit weights: w4a4, w4a8)')
    parser.add_argument('--end2end', action='store_true',
                        help='deploy end to end (*_end2end_static-192x192.py: decoding and '
                             'NMS in the artifact, no torch at run time)')
    parser.add_argument('--symmetric-int8-weights', action='store_true',
                        help='8-bit weights symmetric per channel (ONNX Runtime INT8: int8 '
                             'weights, its u8 x s8 kernel)')
    parser.add_argument('--latency-runs', type=int, default=0,
                        help='real detectors: also time the deployed artifacts (interleaved, '
                             'RUNS runs each, --threads threads)')
    parser.add_argument('--latency-only', action='store_true',
                        help='only time the artifacts an earlier run left in --out')
    parser.add_argument('--ort-profile', type=int, default=0, metavar='RUNS',
                        help='with --latency-runs: ORT kernel time per op type of each ORT '
                             'artifact over RUNS profiled runs')
    parser.add_argument('--threads', type=int, default=1,
                        help='ONNX Runtime / TVM threads of the timed runs')
    parser.add_argument('--out', default='work_dirs/deploy_accuracy')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ['TVM_NUM_THREADS'] = str(args.threads)   # read when TVM's pool first runs
    import mmdet_regptq  # noqa: F401  (registers the hook)
    import mmdet_regptq.deploy  # noqa: F401  (registers the backends)

    out = Path(args.out)
    rows, timed = [], []
    for detector in args.detectors:
        artifacts = {}
        runs = [(backend, bits) for backend in args.backends
                for bits in (args.tvm_bits if backend == 'tvm-int4' else [BACKENDS[backend][1]])]
        for backend, bits in runs:
            real = detector in REAL_DETECTORS
            if backend == 'tvm-fp32' and not real:
                raise SystemExit(f'--backends tvm-fp32: real detectors only, not {detector}')
            work = out / detector / f'{backend}_{bits}'
            artifacts[f'{backend} {bits}'] = work
            if args.latency_only:
                if not (work / 'spec.json').is_file():
                    raise SystemExit(f'--latency-only: {work} holds no deployed artifact')
                continue
            ap_fq, checkpoint = fake_quant(detector, bits, args,
                                           out / detector / f'fake_quant_{bits}')
            row = {'detector': detector, 'backend': backend,
                   'method': args.method[0] if bits != 'fp32' else 'FP',
                   'bits': bits, 'end2end': args.end2end or real,
                   'fake_quant_AP': round(ap_fq, 1)}
            ref = ap_fq
            if real:
                ref = fake_quant_static(detector, bits, checkpoint, args,
                                        out / detector / f'fake_quant_{bits}_640', (640, 640))
                row['fake_quant_AP_640'] = round(ref, 1)
            ap = deployed(detector, backend, checkpoint, args, work)
            row.update(deployed_AP=round(ap, 1), delta=round(ap - ref, 1))
            rows.append(row)
            print(row, flush=True)
        if args.latency_runs and detector in REAL_DETECTORS:
            timed += latency_rows(detector, artifacts, args)
    for name, table_rows in (('deploy_accuracy', rows), ('deploy_latency', timed)):
        if table_rows:
            table = Table.from_rows(table_rows)
            print('\n' + table.to_markdown())
            table.to_csv(out / f'{name}.csv')
            print(f'\nCSV: {out / f"{name}.csv"}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
