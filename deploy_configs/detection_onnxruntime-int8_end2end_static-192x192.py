# ONNX Runtime INT8, one end-to-end graph: the network part rewritten for ORT's integer
# kernels as in detection_onnxruntime-int8_static-192x192.py (QLinearConv, QLinearAdd),
# decoding and NMS in the same graph.
_base_ = ['./_base_/detection_end2end_static.py']
backend_config = dict(type='onnxruntime')
regptq = dict(int4_weights=False, onnx_format='ort_int8', calib_images=4,
              require_quantized=True)
onnx_config = dict(input_shape=[192, 192])
