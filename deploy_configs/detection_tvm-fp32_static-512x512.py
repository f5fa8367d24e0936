# TVM FP32 reference: TVM Relax (0.27) compiling the float export as it is. mmdeploy's own
# 'tvm' backend is written for Relay, which TVM 0.27 no longer has.
_base_ = ['./_base_/detection_raw_static.py']
backend_config = dict(type='tvm_relax', integer=False, mcpu=None)
