"""Raw-output export of a real mmdet detector and the mmdeploy pipeline (onnxruntime)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RETINANET = ROOT / 'configs/synthetic/retinanet_r18-16_fpn64_synthetic.py'


@pytest.fixture(scope='module')
def tiny_retinanet(single_thread):
    import mmdet_regptq  # noqa: F401
    from mmdet_regptq.deploy import build_detector, quantize_for_deploy

    torch.manual_seed(0)
    model = build_detector(str(RETINANET))
    quantize_for_deploy(model, quant=dict(w_bits=4, a_bits=4), method=dict(type='MinMax'),
                        input_shape=(64, 64))
    model._regptq_quantized = True
    return model


def test_raw_detector_export_matches(tiny_retinanet, tmp_path):
    from mmdet_regptq.deploy import RawDetector, export_onnx, raw_output_names, unflatten_raw
    from mmdet_regptq.deploy.onnx.verify import max_abs_diff, ort_run

    x = torch.randn(1, 3, 64, 64)
    names = raw_output_names(tiny_retinanet, x)
    assert names == [f'raw{i}_{j}' for i in range(2) for j in range(5)]   # cls, bbox x 5 levels
    raw = RawDetector(tiny_retinanet).eval()
    report = export_onnx(raw, x, tmp_path / 'retina.onnx', output_names=names)
    assert report.weights and not report.float_weights
    out = ort_run(str(tmp_path / 'retina.onnx'), {'input': x.numpy()}, optimize=False)
    with torch.no_grad():
        ref = tiny_retinanet._forward(x)
    got = unflatten_raw({k: torch.from_numpy(v) for k, v in out.items()})
    assert [len(g) for g in got] == [5, 5]
    diff = max_abs_diff([t for level in ref for t in level], [t for level in got for t in level])
    print(f'RetinaNet raw outputs, ORT (Q/DQ as exported) vs fake-quant: max |diff| = {diff:.3g}')
    assert diff < 1e-3


def test_mmdeploy_pipeline_onnxruntime_int8(tiny_retinanet, tmp_path):
    from mmdeploy.utils import load_config

    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy

    deploy_cfg, model_cfg = load_config(
        str(ROOT / 'deploy_configs/detection_onnxruntime-int8_static-512x512.py'), str(RETINANET))
    deploy_cfg.onnx_config.input_shape = [64, 64]
    deploy_cfg.regptq.calib_images = 1
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    result = deploy(deploy_cfg, model_cfg, None, img, work_dir=tmp_path, test_img=img,
                    model=tiny_retinanet)
    assert result.backend_files == [result.onnx_file]
    proto = onnx.load(result.onnx_file)
    assert any(n.op_type == 'QuantizeLinear' for n in proto.graph.node)
    assert any('ORT INT8' in note for note in result.notes)
    assert any('detections' in note for note in result.notes)
    assert result.max_abs_diff is not None and np.isfinite(result.max_abs_diff)
