# COCO 2017 (mmdet's data/coco layout) with YOLOv5's test-time letterbox: long side 640,
# padded with 114 to a multiple of 32, centred; one image per batch as Ultralytics' val.
# Calibration (RegPTQHook) reads train_dataloader.dataset through the test pipeline.
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
backend_args = None
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='YOLOv5Letterbox', scale=640, size_divisor=32, pad_val=114),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor',
                    'pad_param')),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        filter_cfg=None,
        pipeline=test_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val2017.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator
# mmengine's Runner wants train_dataloader, train_cfg and optim_wrapper together. The train
# images are RegPTQHook's calibration images; YOLOv5Head has no loss, so training is not
# supported (a train run stops at the first loss with that message).
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=1)
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.0))
