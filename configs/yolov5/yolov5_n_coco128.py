# YOLOv5n on the real-data check set beside the repository (../shared/realdata):
# evaluation on coco128_val2017 (64 COCO val2017 images), calibration on coco128_train2017
# (128 COCO train2017 images). Another copy of the folder: set REGPTQ_REALDATA=/path/to/it
# (every path below is derived from it; the path must not contain spaces).
_base_ = './yolov5_n_coco.py'
realdata = '{{$REGPTQ_REALDATA:{{fileDirname}}/../../../shared/realdata}}/'
train_dataloader = dict(dataset=dict(
    data_root=realdata + 'coco128_train2017/',
    ann_file='annotations/instances_train2017.json',
    data_prefix=dict(img='train2017/')))
val_dataloader = dict(dataset=dict(
    data_root=realdata + 'coco128_val2017/',
    ann_file='annotations/instances_val2017.json',
    data_prefix=dict(img='images/val2017/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=realdata + 'coco128_val2017/annotations/instances_val2017.json')
test_evaluator = val_evaluator
