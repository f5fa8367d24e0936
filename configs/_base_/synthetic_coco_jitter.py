# The synthetic set with scale jitter in training (RetinaNet / FCOS recipe): without it the
# first recipe over-fitted the 1,500 training images (RetinaNet train loss 0.20, val AP 0.433).
_base_ = './synthetic_coco.py'
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomResize', scale=(192, 192), ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
