# 640x640 (YOLOv5 at its 640 letterbox: the runtime pads the letterboxed image to this
# shape, centred with 114, as MMDeploy exports a letterbox with a static shape).
# ONNX Runtime INT8, one end-to-end graph: the network part rewritten for ORT's integer
# kernels as in detection_onnxruntime-int8_static-512x512.py (QLinearConv, QLinearAdd),
# decoding and NMS in the same graph.
_base_ = ['./_base_/detection_end2end_static.py']
backend_config = dict(type='onnxruntime')
regptq = dict(int4_weights=False, onnx_format='ort_int8', calib_images=4,
              require_quantized=True)
onnx_config = dict(input_shape=[640, 640])
