# RetinaNet R50-FPN 1x, W3A3: 3-bit weights, 3-bit activations (first layer 8 bit,
# final prediction layers FP), Reg-PTQ calibration on 256 training images.
_base_ = './_base_/retinanet_r50_fpn_regptq_voc0712.py'
custom_hooks = [dict(type='RegPTQHook', quant=dict(w_bits=3, a_bits=3),
                     method={{_base_.regptq_method}}, calib={{_base_.regptq_calib}})]
