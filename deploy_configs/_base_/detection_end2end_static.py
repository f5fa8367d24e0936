# Shared part of the end-to-end deploy configs: ONE graph per detector, image -> dets
# [1, N, 5] + labels [1, N] (MMDeploy's output names and convention), with decoding, score
# threshold, pre-NMS top-k and NMS inside the graph (RoIAlign too for two-stage detectors),
# the settings taken from the model config's test_cfg. The work dir also gets spec.json,
# which the torch-free runtime reads: python -m mmdet_regptq.deploy.run WORK_DIR IMAGES...
# mmdeploy's own End2EndModel ('end2end') evaluates it.
custom_imports = dict(imports=['mmdet_regptq.deploy'], allow_failed_imports=False)
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=21,            # INT4 / UINT4 initializers and Q/DQ need opset 21
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=['dets', 'labels'],
    input_shape=[512, 512],      # [W, H]; static
    optimize=False)
codebase_config = dict(type='mmdet', task='ObjectDetection', model_type='end2end')
# Export options read by mmdet_regptq.deploy (see regptq_options()).
regptq = dict(int4_weights=True, onnx_format='qdq', calib_images=4, require_quantized=False)
