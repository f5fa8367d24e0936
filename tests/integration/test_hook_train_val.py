"""RegPTQHook during `runner.train()`: validation sees a calibrated copy, training keeps
the float model."""
from __future__ import annotations

from pathlib import Path

from mmengine.config import Config
from mmengine.runner import Runner

import mmdet_regptq  # noqa: F401  registers the hook
from mmdet_regptq.datasets.subset import write_coco_subset
from mmdet_regptq.quant import QuantModule

ROOT = Path(__file__).resolve().parents[2]


def test_validation_during_training_uses_a_quantized_copy(synthetic_data, tmp_path):
    cfg = Config.fromfile(ROOT / 'configs/regptq/synthetic/retinanet_r18-16_fpn64_synthetic_qdrop_w4a4.py')
    ann = write_coco_subset(synthetic_data / 'annotations' / 'instances_val.json', 4)
    cfg.work_dir = str(tmp_path)
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=1)
    cfg.param_scheduler = []
    cfg.train_dataloader.update(batch_size=2, num_workers=0, persistent_workers=False)
    cfg.train_dataloader.dataset.indices = 2
    cfg.val_dataloader.update(num_workers=0, persistent_workers=False)
    cfg.val_dataloader.dataset.ann_file = str(ann)
    cfg.val_evaluator.ann_file = str(ann)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=0)
    cfg.custom_hooks[0].update(method=dict(type='QDrop', iters=1),
                               calib=dict(num_images=2, batch_size=2))
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = next(h for h in runner.hooks if type(h).__name__ == 'RegPTQHook')
    assert hook.result is not None and hook.result['report'].num_quantized > 0
    assert not any(isinstance(m, QuantModule) for m in runner.model.modules())
    assert not (tmp_path / 'quantized.pth').exists()  # the copy is not saved
