# YOLOv5m v6.x on COCO 2017 val (data/coco), Ultralytics' validation settings.
# Weights: python tools/convert_yolov5.py yolov5m.pt yolov5m_mmdet.pth
_base_ = ['./_base_/yolov5_p5.py', './_base_/coco_letterbox.py']
deepen_factor = 0.67
widen_factor = 0.75
model = dict(
    backbone=dict(deepen_factor=deepen_factor, widen_factor=widen_factor),
    neck=dict(deepen_factor=deepen_factor, widen_factor=widen_factor),
    bbox_head=dict(widen_factor=widen_factor))
