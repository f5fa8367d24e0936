# TensorRT INT8, explicit quantization, end to end: the graph of
# detection_tensorrt-int8-explicit_static-512x512.py (symmetric 8-bit Q/DQ; see its header
# for the quantization the model needs) with decoding inside and TensorRT's
# BatchedNMSDynamic_TRT plugin node for NMS, as mmdeploy's TensorRT export emits it
# (outputs dets [1, max_per_img, 5] and labels [1, max_per_img], zero padded). RoIAlign
# (two-stage detectors) is ONNX RoiAlign, which TensorRT's ONNX parser takes from 8.6.
# TensorRT is not installed on any machine of this project: tools/deploy.py stops at the
# checked ONNX file.
_base_ = ['./_base_/detection_end2end_static.py']
onnx_config = dict(opset_version=17)
backend_config = dict(
    type='tensorrt',
    common_config=dict(fp16_mode=False, int8_mode=True, explicit_quant_mode=True,
                       max_workspace_size=1 << 30),
    model_inputs=[dict(input_shapes=dict(input=dict(
        min_shape=[1, 3, 512, 512], opt_shape=[1, 3, 512, 512], max_shape=[1, 3, 512, 512])))])
regptq = dict(int4_weights=False, onnx_format='tensorrt', require_quantized=True)
