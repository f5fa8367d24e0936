# YOLOF R50-C5 1x from the MMDetection zoo, fully quantized (backbone, neck, heads) by Reg-PTQ.
# The bit-width configs in the parent folder inherit this file and only set the bits;
# run it with the zoo checkpoint listed in configs/regptq/README.md.
_base_ = 'mmdet::yolof/yolof_r50-c5_8xb8-1x_coco.py'
custom_imports = dict(imports=['mmdet_regptq'], allow_failed_imports=False)
regptq_method = dict(type='RegPTQ')
regptq_calib = dict(num_images=256, batch_size=2)
custom_hooks = [dict(type='RegPTQHook', quant=dict(w_bits=4, a_bits=4), method=regptq_method,
                     calib=regptq_calib)]
