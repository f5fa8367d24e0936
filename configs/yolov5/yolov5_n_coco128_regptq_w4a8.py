# YOLOv5n on the real-data check set (calibration: coco128_train2017, evaluation:
# coco128_val2017), fully quantized by Reg-PTQ at W4A8.
_base_ = ['./yolov5_n_coco128.py', './_base_/regptq_w4a8.py']
