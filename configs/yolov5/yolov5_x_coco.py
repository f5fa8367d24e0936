# YOLOv5x v6.x on COCO 2017 val (data/coco), Ultralytics' validation settings.
# Weights: python tools/convert_yolov5.py yolov5x.pt yolov5x_mmdet.pth
_base_ = ['./_base_/yolov5_p5.py', './_base_/coco_letterbox.py']
deepen_factor = 1.33
widen_factor = 1.25
model = dict(
    backbone=dict(deepen_factor=deepen_factor, widen_factor=widen_factor),
    neck=dict(deepen_factor=deepen_factor, widen_factor=widen_factor),
    bbox_head=dict(widen_factor=widen_factor))
