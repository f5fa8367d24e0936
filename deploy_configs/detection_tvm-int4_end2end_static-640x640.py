# 640x640 (YOLOv5 at its 640 letterbox: the runtime pads the letterboxed image to this
# shape, centred with 114, as MMDeploy exports a letterbox with a static shape).
# TVM INT4 (the mmdeploy backend 'tvm_int4' registered by mmdet_regptq.deploy), end to end
# for dense detectors: the TVM artifact is the network up to the raw head outputs, and the
# NumPy post-processor (mmdet_regptq/deploy/runtime/postprocess.py), configured by the work
# dir's spec.json, decodes and runs NMS (docs/deploy.md says why not inside TVM).
_base_ = ['./_base_/detection_end2end_static.py']
# fast_sigmoid: YOLOv5's SiLUs on TVM's vectorized fast_exp instead of scalar expf
# (mmdet_regptq/deploy/tvm/fast_sigmoid.py; network 2x faster, within 2 float32 ULPs)
backend_config = dict(type='tvm_int4', integer=True, mcpu=None,  # mcpu None: LLVM host CPU
                      fast_sigmoid=True)
regptq = dict(int4_weights=True, onnx_format='qdq', require_quantized=True)
onnx_config = dict(input_shape=[640, 640])
