# 640x640 (YOLOv5 at its 640 letterbox: the runtime pads the letterboxed image to this
# shape, centred with 114, as MMDeploy exports a letterbox with a static shape).
# ONNX Runtime, FP32, one end-to-end graph (a float checkpoint).
_base_ = ['./_base_/detection_end2end_static.py']
backend_config = dict(type='onnxruntime')
onnx_config = dict(input_shape=[640, 640])
