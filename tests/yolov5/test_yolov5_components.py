"""YOLOv5 components without the real data: letterbox, decoding, refused anchors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from yolov5_utils import ROOT, build_model


def test_letterbox_centres_and_maps_boxes() -> None:
    from mmdet.structures.bbox import HorizontalBoxes

    from mmdet_regptq.yolov5 import YOLOv5Letterbox
    img = np.zeros((300, 500, 3), np.uint8)
    boxes = HorizontalBoxes(torch.tensor([[0., 0., 500., 300.]]))
    out = YOLOv5Letterbox()(dict(img=img, gt_bboxes=boxes))
    # 500 -> 640 wide, 300 -> 384 high: already a multiple of 32, no padding
    assert out['img'].shape == (384, 640, 3)
    img = np.zeros((427, 640, 3), np.uint8)
    out = YOLOv5Letterbox()(dict(img=img, gt_bboxes=HorizontalBoxes(torch.tensor(
        [[0., 0., 640., 427.]]))))
    assert out['img_shape'] == (448, 640)
    top, bottom, left, right = out['pad_param'].tolist()
    assert (top, bottom, left, right) == (10, 11, 0, 0)
    assert (out['img'][:10] == 114).all() and (out['img'][-11:] == 114).all()
    assert out['gt_bboxes'].tensor.tolist() == [[0., 10., 640., 437.]]
    with pytest.raises(ValueError, match='scale'):
        YOLOv5Letterbox(scale=0)


def test_decoding_follows_yolov5() -> None:
    """One prior per level: xy = (2s - 0.5 + grid) * stride, wh = (2s)^2 * anchor."""
    from mmengine.config import Config
    model = build_model(Config.fromfile(str(ROOT / 'configs/yolov5/yolov5_n_coco.py')))
    head = model.bbox_head
    maps = [torch.zeros(1, 3 * 85, 640 // s, 640 // s) for s in (8, 16, 32)]
    maps[1][0, 85 + 0, 2, 3] = 2.0       # level 1 (stride 16), anchor 1, cell (y=2, x=3): tx
    maps[1][0, 85 + 3, 2, 3] = -1.0      # th
    boxes, obj, cls = head.decode_maps(maps)
    n0 = 80 * 80 * 3
    idx = n0 + (2 * 40 + 3) * 3 + 1
    s = torch.sigmoid(torch.tensor([2.0, 0.0, 0.0, -1.0]))
    x = (2 * s[0] - 0.5 + 3) * 16
    y = (2 * s[1] - 0.5 + 2) * 16
    w, h = (2 * s[2]) ** 2 * 62, (2 * s[3]) ** 2 * 45
    expected = torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2])
    torch.testing.assert_close(boxes[0, idx], expected)
    assert obj.shape == (1, 3 * (80 * 80 + 40 * 40 + 20 * 20)) and cls.shape[-1] == 80


def test_other_anchors_are_refused() -> None:
    from mmengine.config import Config
    model = build_model(Config.fromfile(str(ROOT / 'configs/yolov5/yolov5_n_coco.py')))
    state = model.state_dict()
    state['bbox_head.anchors'] = state['bbox_head.anchors'] * 1.5
    with pytest.raises(ValueError, match='prior_generator.base_sizes'):
        model.load_state_dict(state)
