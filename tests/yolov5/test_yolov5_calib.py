"""YOLOv5n quantized and calibrated through RegPTQHook by mmdet's Runner (2 iterations).

Fast settings: images letterboxed to 160 px (the code path is the same at 640), two
calibration images, one evaluation image."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from yolov5_utils import coco128_config

SIZE = 160


@pytest.mark.parametrize('method', ['RegPTQ'])
def test_hook_quantizes_and_calibrates_yolov5n(realdata: Path, converted: Path,
                                              tmp_path: Path, method: str) -> None:
    from mmengine.runner import Runner

    from mmdet_regptq.datasets.subset import write_coco_subset
    cfg = coco128_config()
    for loader in ('train_dataloader', 'test_dataloader'):
        for step in cfg[loader].dataset.pipeline:
            if step['type'] == 'YOLOv5Letterbox':
                step['scale'] = SIZE
    ann = write_coco_subset(cfg.test_evaluator.ann_file, 1, dst=tmp_path / 'val1.json')
    cfg.test_dataloader.dataset.ann_file = str(ann)
    cfg.test_evaluator.ann_file = str(ann)
    cfg.work_dir = str(tmp_path)
    cfg.load_from = str(converted)
    cfg.custom_hooks = [dict(type='RegPTQHook', quant=dict(w_bits=4, a_bits=4),
                             method=dict(type=method, iters=2, progress=False, log_interval=0),
                             calib=dict(num_images=2, batch_size=2))]
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    assert metrics['coco/bbox_mAP'] >= 0.0
    hook = next(h for h in runner.hooks if type(h).__name__ == 'RegPTQHook')
    layers = {r.name: r for r in hook.result['report'].layers}
    # paper conventions: first layer 8 bit, the three 1x1 prediction convs FP
    assert (layers['backbone.stem.conv'].w_bits, layers['backbone.stem.conv'].a_bits) == (8, 8)
    assert (layers['neck.out_p5.final_conv.conv'].w_bits,
            layers['neck.out_p5.final_conv.conv'].a_bits) == (4, 4)
    for j in range(3):
        assert layers[f'bbox_head.convs_pred.{j}'].w_bits is None
    log = Path(runner.log_dir, f'{Path(runner.log_dir).name}.log').read_text()
    assert 'falls back to the MSE' not in log       # FGIC decoded YOLOv5's boxes
    assert 'RegPTQ: LLAQ (reg) on 3' in log           # LLAQ on the three PAN output convs
    saved = torch.load(tmp_path / 'quantized.pth', map_location='cpu', weights_only=True)
    assert saved['meta']['method'] == method
