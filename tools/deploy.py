"""Deploy a (quantized) mmdet detector with MMDeploy — the arguments of mmdeploy's
``tools/deploy.py``, which the mmdeploy 1.3.1 wheel does not ship.

    python tools/deploy.py DEPLOY_CFG MODEL_CFG CHECKPOINT IMG [--work-dir DIR]
        [--device cpu] [--test-img IMG] [--eval] [--target-cpu {host,avx2,vnni}]

CHECKPOINT is a float checkpoint (FP32 deployment) or the ``quantized.pth`` written by
``RegPTQHook`` / ``quantize_detector`` (its meta holds the policy and method; the model is
quantized the same way and the calibrated state loaded). The deploy config's
``custom_imports`` loads ``mmdet_regptq.deploy`` (our ``tvm_int4`` / ``tvm_relax``
backends). Steps: export (raw head outputs, Q/DQ) → ``mmdeploy.apis.utils.to_backend`` →
the backend model on the export image vs PyTorch (max |diff| of the raw outputs) → with
``--test-img`` a prediction, with ``--eval`` AP on the model config's test set.
``--target-cpu`` sets the deploy config's ``regptq.target_cpu``: the CPU the model will run
on (ONNX Runtime INT8: its weight layout; ``tvm_int4``: the LLVM CPU and int8 kernel);
``avx2`` when it may lack AVX-512 VNNI (docs/deploy.md, "CPUs without AVX-512 VNNI").
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a model to a backend (MMDeploy).')
    parser.add_argument('deploy_cfg', help='deploy config path')
    parser.add_argument('model_cfg', help='model config path')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='float checkpoint or quantized.pth (none: random init)')
    parser.add_argument('img', help='image used to convert the model')
    parser.add_argument('--work-dir', default='work_dirs/deploy', help='output directory')
    parser.add_argument('--device', default='cpu', help='device (only cpu is supported)')
    parser.add_argument('--test-img', default=None, help='image to run the backend model on')
    parser.add_argument('--eval', action='store_true',
                        help="evaluate the backend model on the model config's test set")
    parser.add_argument('--target-cpu', default=None, choices=['host', 'avx2', 'vnni'],
                        help="ONNX Runtime INT8 / tvm_int4: the CPU the model will run on "
                             "(overrides regptq.target_cpu; 'avx2': any x86 CPU, also "
                             "without VNNI)")
    parser.add_argument('--log-level', default='INFO',
                        choices=['DEBUG', 'INFO', 'WARNING', 'ERROR'])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format='%(levelname)s %(name)s: %(message)s')
    from mmdeploy.utils import load_config

    import mmdet_regptq  # noqa: F401  (compat fixes, registries)
    from mmdet_regptq.safe_load import checkpoint_problem
    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy, evaluate

    problem = checkpoint_problem(args.checkpoint)   # corrupt / unsafe: one line, no traceback
    if problem:
        print(f'deploy.py: error: {problem}', file=sys.stderr)
        return 2
    deploy_cfg, model_cfg = load_config(args.deploy_cfg, args.model_cfg)
    if args.target_cpu is not None:
        deploy_cfg.merge_from_dict({'regptq.target_cpu': args.target_cpu})
    result = deploy(deploy_cfg, model_cfg, args.checkpoint, args.img, work_dir=args.work_dir,
                    device=args.device, test_img=args.test_img)
    print(f'onnx: {result.onnx_file}')
    print(f'backend files: {result.backend_files}')
    for note in result.notes:
        print(note)
    if args.eval and result.backend_files:
        metrics = evaluate(deploy_cfg, model_cfg, result.backend_files, work_dir=args.work_dir,
                           device=args.device)
        print('metrics:', json.dumps({k: float(v) for k, v in metrics.items()}))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
