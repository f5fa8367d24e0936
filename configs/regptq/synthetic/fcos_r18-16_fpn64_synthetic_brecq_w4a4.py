# BRECQ at W4A4 on the bundled fcos (other bits: --cfg-options
# custom_hooks.0.quant.w_bits=2 custom_hooks.0.quant.a_bits=4).
_base_ = ['../../synthetic/fcos_r18-16_fpn64_synthetic.py', './_base_/brecq_w4a4.py']
