# RegPTQ at W4A4 on the bundled retinanet (bits: --cfg-options
# custom_hooks.0.quant.w_bits=2 custom_hooks.0.quant.a_bits=4).
_base_ = '../../synthetic/retinanet_r18-16_fpn64_synthetic.py'
custom_imports = dict(imports=['mmdet_regptq'], allow_failed_imports=False)
custom_hooks = [
    dict(type='RegPTQHook',
         quant=dict(w_bits=4, a_bits=4),
         method=dict(type='RegPTQ'),
         calib=dict(num_images=256, batch_size=2, seed=0))
]
