"""``tools/deploy.py --eval`` feeds the static batch-1 graphs one image at a time."""
from __future__ import annotations

from pathlib import Path

import mmdeploy.apis

from mmdet_regptq.deploy.mmdeploy import pipeline

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_sets_the_test_loader_to_batch_1(monkeypatch, tmp_path):
    seen = {}

    class Processor:
        def build_backend_model(self, files):
            return object()

        def build_test_runner(self, model, work_dir):
            class Runner:
                def test(self):
                    return {'coco/bbox_mAP': 0.5}
            return Runner()

    def build_task_processor(model_cfg, deploy_cfg, device):
        seen['batch_size'] = model_cfg.test_dataloader.batch_size
        return Processor()

    monkeypatch.setattr(mmdeploy.apis, 'build_task_processor', build_task_processor)
    model_cfg = ROOT / 'configs/synthetic/retinanet_r18-16_fpn64_synthetic.py'
    deploy_cfg = ROOT / 'deploy_configs/detection_tvm-int4_end2end_static-192x192.py'
    metrics = pipeline.evaluate(str(deploy_cfg), str(model_cfg), ['end2end.onnx'],
                                work_dir=tmp_path)
    assert metrics == {'coco/bbox_mAP': 0.5}
    assert seen['batch_size'] == 1   # the config's own test loader has batch 8
