# 640x640 (YOLOv5 at its 640 letterbox). TVM FP32 reference end to end: TVM Relax (0.27)
# compiling the float network with this package's CPU schedules (no integer rewrite), and
# the NumPy post-processor, as detection_tvm-int4_end2end_static-640x640.py but float: it
# tells the schedules' speed apart from the integer kernels'.
_base_ = ['./_base_/detection_end2end_static.py']
backend_config = dict(type='tvm_relax', integer=False, mcpu=None)
onnx_config = dict(input_shape=[640, 640])
