# Reg-PTQ at W4A8 (first layer 8 bit, the three 1x1 prediction convs FP), calibrated on 128
# train images through the test pipeline (the model config imports mmdet_regptq).
# Other bits / methods: --cfg-options custom_hooks.0.quant.a_bits=4 custom_hooks.0.method.type=QDrop
custom_hooks = [
    dict(type='RegPTQHook',
         quant=dict(w_bits=4, a_bits=8),
         method=dict(type='RegPTQ'),
         calib=dict(num_images=128, batch_size=2, seed=0))
]
