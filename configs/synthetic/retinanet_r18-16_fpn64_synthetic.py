# Bundled RetinaNet: anchors, sigmoid classification, delta box regression.
# A ResNet-18 at a quarter of the width (base_channels=16), 64-channel FPN and head,
# trained from scratch on the synthetic set (see checkpoints/README.md for the command).
# Levels P2-P6 (strides 4-64) with anchors of 8-203 px: the objects are 10-120 px.
_base_ = ['../_base_/synthetic_coco_jitter.py', '../_base_/schedule_synthetic.py']
model = dict(
    type='RetinaNet',
    data_preprocessor=dict(
        type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(
        type='ResNet', depth=18, base_channels=16, num_stages=4, out_indices=(0, 1, 2, 3),
        frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False,
        style='pytorch', init_cfg=None),
    neck=dict(
        type='FPN', in_channels=[16, 32, 64, 128], out_channels=64, start_level=0,
        add_extra_convs='on_input', num_outs=5),
    bbox_head=dict(
        type='RetinaHead', num_classes=6, in_channels=64, stacked_convs=2, feat_channels=64,
        anchor_generator=dict(
            type='AnchorGenerator', octave_base_scale=2, scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                      ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1, debug=False),
    test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05,
                  nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
