# The three lines that quantize any detector config with PDQuant at W4A4.
custom_imports = dict(imports=['mmdet_regptq'], allow_failed_imports=False)
custom_hooks = [
    dict(type='RegPTQHook',
         quant=dict(w_bits=4, a_bits=4),
         method=dict(type='PDQuant'),
         calib=dict(num_images=256, batch_size=2, seed=0))
]
