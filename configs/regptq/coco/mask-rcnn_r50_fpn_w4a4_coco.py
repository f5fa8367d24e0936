# Mask R-CNN R50-FPN 1x, W4A4: 4-bit weights, 4-bit activations (first layer 8 bit,
# final prediction layers FP), Reg-PTQ calibration on 256 training images.
_base_ = './_base_/mask-rcnn_r50_fpn_regptq_coco.py'
custom_hooks = [dict(type='RegPTQHook', quant=dict(w_bits=4, a_bits=4),
                     method={{_base_.regptq_method}}, calib={{_base_.regptq_calib}})]
