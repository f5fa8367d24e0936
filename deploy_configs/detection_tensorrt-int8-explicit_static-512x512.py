# TensorRT INT8, explicit quantization (Q/DQ in the ONNX graph; no TensorRT calibration).
# Needs a model quantized SYMMETRICALLY at 8 bits (zero point 0, int8 activations and
# weights, weights per output channel on axis 0), e.g. the hook's
#   quant=dict(w_bits=8, a_bits=8, first_layer_bits=8,
#              weight=dict(type='Uniform', per_channel=True, symmetric=True, scale_method='minmax'),
#              act=dict(type='Uniform', per_channel=False, symmetric=True, scale_method='minmax'))
# The export is validated against TensorRT's explicit-quantization rules
# (mmdet_regptq/deploy/mmdeploy/tensorrt.py). TensorRT itself is NOT installed on any machine of
# this project (it needs an NVIDIA GPU and its wheels), so tools/deploy.py stops at the
# validated ONNX file; on a machine with TensorRT, mmdeploy's TensorRT manager builds the
# engine from it with the backend_config below.
_base_ = ['./_base_/detection_raw_static.py']
onnx_config = dict(opset_version=17)
backend_config = dict(
    type='tensorrt',
    common_config=dict(fp16_mode=False, int8_mode=True, explicit_quant_mode=True,
                       max_workspace_size=1 << 30),
    model_inputs=[dict(input_shapes=dict(input=dict(
        min_shape=[1, 3, 512, 512], opt_shape=[1, 3, 512, 512], max_shape=[1, 3, 512, 512])))])
regptq = dict(int4_weights=False, onnx_format='tensorrt', require_quantized=True)
