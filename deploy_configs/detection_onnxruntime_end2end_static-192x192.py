# ONNX Runtime, FP32, one end-to-end graph (a float checkpoint).
_base_ = ['./_base_/detection_end2end_static.py']
backend_config = dict(type='onnxruntime')
onnx_config = dict(input_shape=[192, 192])
