# Shared part of the end-to-end deploy configs: ONE graph per detector, image -> dets
# [1, N, 5] + labels [1, N] (MMDeploy's output names and convention), with decoding, score
# threshold, pre-NMS top-k and NMS inside the graph (RoIAlign too for two-stage detectors),
# the settings taken from the model config's test_cfg. The work dir also gets spec.json,
# which the torch-free runtime reads: python -m mmdet_regptq.deploy.run WORK_DIR IMAGES...
# mmdeploy's own End2EndModel ('end2end') evaluates it. Everything else (opset, static
# shape, export options) is the raw-output configs' (detection_raw_static.py).
_base_ = ['./detection_raw_static.py']
onnx_config = dict(output_names=['dets', 'labels'])
codebase_config = dict(model_type='end2end')
