# AdaQuant at W4A4 on the bundled faster-rcnn (other bits: --cfg-options
# custom_hooks.0.quant.w_bits=2 custom_hooks.0.quant.a_bits=4).
_base_ = ['../../synthetic/faster-rcnn_r18-16_fpn64_synthetic.py', './_base_/adaquant_w4a4.py']
