# Ultralytics YOLOv5 v6.x (P5, 640) as mmdet components from mmdet_regptq.yolov5.
# Sizes set deepen_factor / widen_factor (the yaml's depth_multiple / width_multiple) in
# backbone, neck and head. Weights: tools/convert_yolov5.py <yolov5*.pt> <out.pth>.
_base_ = 'mmdet::_base_/default_runtime.py'
custom_imports = dict(imports=['mmdet_regptq'], allow_failed_imports=False)
model = dict(
    type='YOLOv5Detector',
    data_preprocessor=dict(
        type='DetDataPreprocessor', mean=[0., 0., 0.], std=[255., 255., 255.],
        bgr_to_rgb=True, pad_size_divisor=32, pad_value=114 / 255),
    backbone=dict(type='YOLOv5CSPDarknet', deepen_factor=1.0, widen_factor=1.0,
                  out_indices=(2, 3, 4)),
    neck=dict(type='YOLOv5PAFPN', deepen_factor=1.0, widen_factor=1.0),
    bbox_head=dict(
        type='YOLOv5Head', num_classes=80, in_channels=[256, 512, 1024], widen_factor=1.0,
        prior_generator=dict(
            type='YOLOAnchorGenerator', strides=[8, 16, 32],
            base_sizes=[[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)],
                        [(116, 90), (156, 198), (373, 326)]]),
        bbox_coder=dict(type='YOLOv5BBoxCoder')),
    # Ultralytics validation: multi-label, conf 0.001, class-wise NMS IoU 0.65, 300 kept
    test_cfg=dict(score_thr=0.001, nms=dict(type='nms', iou_threshold=0.65),
                  max_per_img=300, nms_pre=30000, multi_label=True))
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
