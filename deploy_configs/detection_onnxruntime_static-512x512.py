# ONNX Runtime, FP32 reference (a float checkpoint).
_base_ = ['./_base_/detection_raw_static.py']
backend_config = dict(type='onnxruntime')
