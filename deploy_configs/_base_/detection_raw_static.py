# Shared part of the deploy configs of this project (self-contained: no _base_ into
# mmdeploy's repository, whose wheel ships no configs).
#
# The graph is the detector's backbone + neck + head up to the raw head outputs
# (``model._forward``; outputs raw<i>_<j>), static shape; mmdet's predict_by_feat + NMS run
# in PyTorch in the 'regptq_raw' backend model registered by mmdet_regptq.deploy.
custom_imports = dict(imports=['mmdet_regptq.deploy'], allow_failed_imports=False)
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=21,            # INT4 / UINT4 initializers and Q/DQ need opset 21
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=[],             # filled by the export: raw<i>_<j>
    input_shape=[512, 512],      # [W, H]; static
    optimize=False)
codebase_config = dict(type='mmdet', task='ObjectDetection', model_type='regptq_raw')
# Export options read by mmdet_regptq.deploy (see regptq_options()).
regptq = dict(int4_weights=True, onnx_format='qdq', calib_images=4, require_quantized=False)
