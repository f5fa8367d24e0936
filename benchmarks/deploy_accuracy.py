"""Deployed AP vs fake-quant AP of the bundled detectors.

    python benchmarks/deploy_accuracy.py [--detectors retinanet fcos faster-rcnn]
        [--method QDrop]
        (--method: a name, or LABEL=NAME{json options} as in benchmarks/accuracy.py)
        [--iters 100] [--num-images 32] [--val-images 100]
        [--backends tvm-int4 onnxruntime-int8]

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
RoIAlign; not on ``tvm-int4``), evaluated by mmdeploy's own ``End2EndModel``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mmdet_regptq.bench.models import REPO_ROOT as ROOT
from mmdet_regptq.bench.models import SYNTHETIC_DETECTORS as DETECTORS
from mmdet_regptq.bench.specs import parse_bits, parse_method
from mmdet_regptq.table import Table

#: backend -> (deploy config, the bit width of the model it deploys)
BACKENDS = {'tvm-int4': ('detection_tvm-int4_static-192x192.py', 'w4a4'),
            'onnxruntime-int8': ('detection_onnxruntime-int8_static-192x192.py', 'w8a8')}
#: the same with ``--end2end``: one artifact, decoding and NMS inside (no torch at run time)
END2END = {'tvm-int4': 'detection_tvm-int4_end2end_static-192x192.py',
           'onnxruntime-int8': 'detection_onnxruntime-int8_end2end_static-192x192.py'}


def model_config(detector: str, val_images: int, work: Path):
    """The bundled config with a val subset (CocoMetric scores every image of its file)."""
    from mmengine.config import Config

    from mmdet_regptq.datasets.subset import write_coco_subset

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


def fake_quant(detector: str, bits: str, args: argparse.Namespace, work: Path
               ) -> tuple[float, Path]:
    """Calibrate + test the fake-quant model; returns (AP, quantized.pth)."""
    from mmengine.runner import Runner

    cfg = model_config(detector, args.val_images, work)
    cfg.load_from = str(ROOT / 'checkpoints' / f'{DETECTORS[detector]}.pth')
    w_bits, a_bits = parse_bits(bits)
    cfg.custom_hooks = [dict(type='RegPTQHook', quant=dict(w_bits=w_bits, a_bits=a_bits),
                             method=dict(type=args.method[1], iters=args.iters,
                                         **args.method[2]),
                             calib=dict(num_images=args.num_images, batch_size=2,
                                        seed=args.seed))]
    metrics = Runner.from_cfg(cfg).test()
    return 100 * metrics['coco/bbox_mAP'], work / 'quantized.pth'


def deployed(detector: str, backend: str, checkpoint: Path, args: argparse.Namespace,
             work: Path) -> float:
    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy, evaluate

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
    return 100 * metrics['coco/bbox_mAP']


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--detectors', nargs='+', default=list(DETECTORS),
                        choices=list(DETECTORS))
    parser.add_argument('--method', default='QDrop', type=parse_method,
                        help='a method name or LABEL=NAME{json options}, e.g. '
                             '\'RegPTQ-p2=RegPTQ{"llaq": {"quantizer": {"power_of_two": '
                             'true}}}\'')
    parser.add_argument('--iters', type=int, default=100)
    parser.add_argument('--num-images', type=int, default=32)
    parser.add_argument('--val-images', type=int, default=100, help='0 = the whole val split')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--backends', nargs='+', default=list(BACKENDS),
                        choices=list(BACKENDS))
    parser.add_argument('--end2end', action='store_true',
                        help='deploy end to end (*_end2end_static-192x192.py: decoding and '
                             'NMS in the artifact); Faster R-CNN on tvm-int4 is refused')
    parser.add_argument('--out', default='work_dirs/deploy_accuracy')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import mmdet_regptq  # noqa: F401  (registers the hook)
    import mmdet_regptq.deploy  # noqa: F401  (registers the backends)

    out = Path(args.out)
    rows = []
    for detector in args.detectors:
        for backend in args.backends:
            if args.end2end and backend == 'tvm-int4' and detector == 'faster-rcnn':
                continue   # no end-to-end TVM deployment of a two-stage detector
            bits = BACKENDS[backend][1]
            ap_fq, checkpoint = fake_quant(detector, bits, args,
                                           out / detector / f'fake_quant_{bits}')
            ap = deployed(detector, backend, checkpoint, args, out / detector / backend)
            row = {'detector': detector, 'backend': backend,
                   'method': args.method[0],
                   'bits': bits, 'end2end': args.end2end, 'fake_quant_AP': round(ap_fq, 1),
                   'deployed_AP': round(ap, 1), 'delta': round(ap - ap_fq, 1)}
            rows.append(row)
            print(row, flush=True)
    table = Table.from_rows(rows)
    print('\n' + table.to_markdown())
    table.to_csv(out / 'deploy_accuracy.csv')
    print(f'\nCSV: {out / "deploy_accuracy.csv"}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
