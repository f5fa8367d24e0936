# TVM INT4 (ours): the mmdeploy backend 'tvm_int4' registered by mmdet_regptq.deploy.
# Quantized Conv/Gemm layers run as integer ops (int8 x int8 -> int32 for <= 4-bit
# layers), weights stored bit-packed (eight 4-bit codes per int32), llvm for the host CPU.
_base_ = ['./_base_/detection_raw_static.py']
backend_config = dict(type='tvm_int4', integer=True, mcpu=None)  # mcpu None: LLVM host CPU
regptq = dict(int4_weights=True, onnx_format='qdq', require_quantized=True)
