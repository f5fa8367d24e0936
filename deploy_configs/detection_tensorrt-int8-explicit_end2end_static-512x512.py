# TensorRT INT8, explicit quantization, end to end: the graph of
# detection_tensorrt-int8-explicit_static-512x512.py (symmetric 8-bit Q/DQ; see its header
# for the quantization the model needs) with decoding inside and TensorRT's built-in
# EfficientNMS_TRT plugin node for NMS (outputs dets [1, max_per_img, 5] and labels
# [1, max_per_img], zero padded). RoIAlign (two-stage detectors) is ONNX RoiAlign, which
# TensorRT's ONNX parser takes from 8.6. TensorRT is not installed on any machine of this
# project: tools/deploy.py stops at the checked ONNX file.
_base_ = ['./detection_tensorrt-int8-explicit_static-512x512.py']
onnx_config = dict(output_names=['dets', 'labels'])
codebase_config = dict(model_type='end2end')
