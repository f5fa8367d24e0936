# MSE at W4A4 on the bundled retinanet (other bits: --cfg-options
# custom_hooks.0.quant.w_bits=2 custom_hooks.0.quant.a_bits=4).
_base_ = ['../../synthetic/retinanet_r18-16_fpn64_synthetic.py', './_base_/mse_w4a4.py']
