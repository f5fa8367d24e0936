# YOLOv5n v6.x on COCO 2017 val (data/coco), Ultralytics' validation settings.
# Weights: python tools/convert_yolov5.py yolov5n.pt yolov5n_mmdet.pth
_base_ = ['./_base_/yolov5_p5.py', './_base_/coco_letterbox.py']
deepen_factor = 0.33
widen_factor = 0.25
model = dict(
    backbone=dict(deepen_factor=deepen_factor, widen_factor=widen_factor),
    neck=dict(deepen_factor=deepen_factor, widen_factor=widen_factor),
    bbox_head=dict(widen_factor=widen_factor))
