# ONNX Runtime INT8 (static shape): our Q/DQ export with 8-bit weight containers, rewritten
# so ORT's CPU provider fuses every quantized conv into QLinearConv (u8 activations, s8
# weights): weights re-centred to int8 with zero point 0, and quantized conv outputs that do
# not already end in our own QuantizeLinear get an 8-bit Q/DQ whose range is measured on
# `calib_images` test-set images (see mmdet_regptq/deploy/onnx/ort_int8.py).
_base_ = ['./_base_/detection_raw_static.py']
backend_config = dict(type='onnxruntime')
regptq = dict(int4_weights=False, onnx_format='ort_int8', calib_images=4,
              require_quantized=True)
