"""FP parity: the mmdet model's raw head outputs vs an independent forward of the original
weights, on real COCO val images through the config's own test pipeline."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from yolov5_utils import build_model, coco128_config
from yolov5_reference import reference_forward


@pytest.fixture(scope='module')
def model_and_batch(converted: Path):
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DATASETS
    from mmengine.runner import load_checkpoint
    cfg = coco128_config()
    model = build_model(cfg)
    load_checkpoint(model, str(converted), map_location='cpu', strict=True)
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    # the first image (640x427, padded to 640x448) and one portrait image
    batch = model.data_preprocessor(pseudo_collate([dataset[0]]), False)
    return model, batch, dataset


def test_raw_outputs_match_reference(model_and_batch, realdata: Path, yolov5n_meta) -> None:
    model, batch, dataset = model_and_batch
    plain = torch.load(realdata / 'yolov5n' / 'yolov5n_state_dict.pth', weights_only=True)
    inputs = batch['inputs']
    assert inputs.shape[-2] % 32 == 0 and inputs.shape[-1] == 640
    with torch.no_grad():
        ours = model._forward(inputs, batch['data_samples'])[0]
    ref = reference_forward(plain, yolov5n_meta, inputs)
    assert [o.shape for o in ours] == [r.shape for r in ref]
    diff = max((o - r).abs().max().item() for o, r in zip(ours, ref))
    assert diff <= 1e-4, diff
    # the letterbox centred the image: equal padding top and bottom (±1 px)
    pad = batch['data_samples'][0].pad_param
    assert abs(pad[0] - pad[1]) <= 1 and pad[2] == pad[3] == 0


def test_predictions_in_original_pixels(model_and_batch) -> None:
    model, batch, _ = model_and_batch
    with torch.no_grad():
        pred = model.predict(batch['inputs'], batch['data_samples'])[0].pred_instances
    h, w = batch['data_samples'][0].ori_shape
    assert 0 < len(pred) <= 300
    assert float(pred.scores.min()) > 0.001
    assert float(pred.bboxes[:, 2].max()) <= w and float(pred.bboxes[:, 3].max()) <= h
    # image 139 (living room): people (0) and a tv (62) among the confident detections
    confident = set(pred.labels[pred.scores > 0.5].tolist())
    assert {0, 62} <= confident, confident
