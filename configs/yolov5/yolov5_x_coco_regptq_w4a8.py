# YOLOv5x on COCO 2017, fully quantized by Reg-PTQ at W4A8 before mmdet evaluates it.
_base_ = ['./yolov5_x_coco.py', './_base_/regptq_w4a8.py']
