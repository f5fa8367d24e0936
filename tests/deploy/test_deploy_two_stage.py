"""Faster R-CNN deployed as two graphs (image → features + RPN; RoI features → box head)
with mmdet's RPN decoding, NMS and RoIAlign on the host between them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FRCNN = ROOT / 'configs/synthetic/faster-rcnn_r18-16_fpn64_synthetic.py'
CHECKPOINT = ROOT / 'checkpoints/faster-rcnn_r18-16_fpn64_synthetic.pth'
VAL_IMAGE = ROOT / 'data/synthetic/val/000003.jpg'


@pytest.fixture(scope='module')
def quantized_frcnn(single_thread):
    """The bundled Faster R-CNN, W4A4 MinMax-calibrated on two val images."""
    import mmdet_regptq  # noqa: F401
    from mmdet_regptq.deploy import build_detector, quantize_for_deploy

    torch.manual_seed(0)
    model = build_detector(str(FRCNN), str(CHECKPOINT))
    quantize_for_deploy(model, quant=dict(w_bits=4, a_bits=4), method=dict(type='MinMax'),
                        input_shape=(192, 192))
    model._regptq_quantized = True
    return model


def _detections(samples, min_score=0.3):
    dets = samples[0].pred_instances
    keep = dets.scores > min_score
    order = dets.scores[keep].argsort(descending=True)
    return dets.bboxes[keep][order], dets.scores[keep][order], dets.labels[keep][order]


def test_roi_graph_runs_any_number_of_rois_in_padded_chunks():
    from mmdet_regptq.deploy.detectors.two_stage import run_in_chunks

    calls = []

    def graph(x):
        calls.append(x.shape[0])
        return x.sum(dim=(1, 2, 3))[:, None], x.mean(dim=(1, 2, 3))[:, None].repeat(1, 4)

    feats = torch.randn(7, 2, 3, 3)
    scores, deltas = run_in_chunks(graph, feats, num_rois=3)
    assert calls == [3, 3, 3]                      # 7 RoIs: 3 + 3 + 1 zero-padded to 3
    torch.testing.assert_close(scores[:, 0], feats.sum(dim=(1, 2, 3)))
    assert deltas.shape == (7, 4)


def test_host_pools_with_torchvision_roi_align_and_gets_mmcvs_values(single_thread):
    """The host's RoIAlign switch (faster kernel) changes no RoI feature."""
    import mmdet_regptq  # noqa: F401
    from mmdet_regptq.deploy import build_detector
    from mmdet_regptq.deploy.detectors.two_stage import RpnStage, TwoStageHost

    torch.manual_seed(0)
    x = torch.randn(1, 3, 160, 192)
    meta = dict(img_shape=(160, 192), ori_shape=(160, 192), pad_shape=(160, 192),
                scale_factor=(1.0, 1.0), batch_input_shape=(160, 192))
    mmcv_host = TwoStageHost(build_detector(str(FRCNN), str(CHECKPOINT)), 100,
                             torchvision_roi_align=False)
    fast_host = TwoStageHost(build_detector(str(FRCNN), str(CHECKPOINT)), 100)
    layers = list(fast_host.detector.roi_head.bbox_roi_extractor.roi_layers)
    assert layers and all(layer.use_torchvision for layer in layers)
    assert not any(layer.use_torchvision
                   for layer in mmcv_host.detector.roi_head.bbox_roi_extractor.roi_layers)
    stage1 = RpnStage(mmcv_host.detector).eval()
    expected = mmcv_host.sample_roi_features(stage1, x, [meta])
    assert expected.abs().sum() > 0
    torch.testing.assert_close(fast_host.sample_roi_features(stage1, x, [meta]), expected,
                               rtol=0, atol=1e-6)


def test_num_rois_comes_from_the_rpn_test_cfg_or_the_deploy_config():
    from mmengine.config import Config

    from mmdet_regptq.deploy.mmdeploy.options import regptq_options
    from mmdet_regptq.deploy.detectors.two_stage import num_rois_of

    cfg = Config.fromfile(str(FRCNN))
    assert num_rois_of(cfg) == cfg.model.test_cfg.rpn.max_per_img == 100
    assert num_rois_of(cfg, 64) == 64
    with pytest.raises(ValueError, match='regptq.num_rois=-2'):
        num_rois_of(cfg, -2)
    cfg.model.test_cfg.rpn.pop('max_per_img')
    with pytest.raises(ValueError, match='max_per_img is not set'):
        num_rois_of(cfg)
    assert regptq_options(dict(regptq=dict(num_rois=50)))['num_rois'] == 50


def _deployed_and_reference(model, deploy_cfg, model_cfg, backend_files):
    """Detections of the backend model and of the fake-quant model's ``predict``, and the
    backend model."""
    from mmdeploy.apis import build_task_processor

    processor = build_task_processor(model_cfg, deploy_cfg, 'cpu')
    backend_model = processor.build_backend_model(backend_files)
    data, _ = processor.create_input(str(VAL_IMAGE), None, data_preprocessor=None)
    batch = backend_model.data_preprocessor(data, False)
    deployed = backend_model(batch['inputs'], batch['data_samples'], mode='predict')
    data, _ = processor.create_input(str(VAL_IMAGE), None, data_preprocessor=None)
    batch = model.data_preprocessor(data, False)
    with torch.no_grad():
        reference = model.predict(batch['inputs'], batch['data_samples'])
    return _detections(deployed), _detections(reference), backend_model


def _spinning(wrapper) -> str:
    options = wrapper.sess.get_session_options()
    return options.get_session_config_entry('session.intra_op.allow_spinning')


def test_onnxruntime_int8_deployment_finds_the_fake_quant_detections(quantized_frcnn,
                                                                     tmp_path):
    """ORT INT8 (QLinearConv, its own requantization rounding: not bit-exact) finds the
    fake-quant model's confident detections."""
    from mmdeploy.utils import load_config
    from mmdet.structures.bbox import bbox_overlaps

    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy

    deploy_cfg, model_cfg = load_config(
        str(ROOT / 'deploy_configs/detection_onnxruntime-int8_static-192x192.py'), str(FRCNN))
    deploy_cfg.regptq.calib_images = 2
    result = deploy(deploy_cfg, model_cfg, None, str(VAL_IMAGE), work_dir=tmp_path,
                    model=quantized_frcnn)
    assert result.backend_files == [str(tmp_path / 'end2end.onnx'),
                                    str(tmp_path / 'end2end_roi.onnx')]
    roi_graph = onnx.load(result.backend_files[1])
    assert [i.name for i in roi_graph.graph.input] == ['roi_feats']
    assert sum('ORT INT8' in note for note in result.notes) == 2     # both graphs rewritten
    assert any('RoI graph outputs vs PyTorch' in note for note in result.notes)
    assert np.isfinite(result.max_abs_diff)

    (boxes, _, labels), (ref_boxes, ref_scores, ref_labels), backend_model = \
        _deployed_and_reference(quantized_frcnn, deploy_cfg, model_cfg, result.backend_files)
    # two sessions + host steps: ORT's idle workers must not spin (they took the cores)
    assert [_spinning(w) for w in (backend_model.wrapper, backend_model.roi_wrapper)] == ['0', '0']
    confident = ref_scores > 0.5
    assert int(confident.sum()) > 0
    iou = bbox_overlaps(ref_boxes[confident], boxes)                 # [confident, deployed]
    same_label = ref_labels[confident][:, None] == labels[None]
    found = ((iou > 0.8) & same_label).any(dim=1)
    assert found.float().mean() >= 0.8, (found, iou.max(dim=1).values)


def test_tvm_int4_deployment_predicts_what_the_fake_quant_model_predicts(
        quantized_frcnn, tmp_path):
    """TVM INT4 computes the quantized layers exactly: both graphs + the host steps give
    mmdet's ``predict`` of the fake-quant PyTorch model."""
    from mmdeploy.utils import load_config

    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy

    deploy_cfg, model_cfg = load_config(
        str(ROOT / 'deploy_configs/detection_tvm-int4_static-192x192.py'), str(FRCNN))
    result = deploy(deploy_cfg, model_cfg, None, str(VAL_IMAGE), work_dir=tmp_path,
                    model=quantized_frcnn, test_img=str(VAL_IMAGE))
    assert len(result.backend_files) == 6            # model.so, weights.npz, meta.json x 2
    assert {Path(f).parent.name for f in result.backend_files} == {
        'end2end_tvm_int4', 'end2end_roi_tvm_int4'}
    meta = (tmp_path / 'end2end_roi_tvm_int4' / 'meta.json').read_text()
    assert 'shared_fcs.0' in meta                    # the box head's fcs run as integer ops
    assert result.max_abs_diff < 1e-3, result.notes
    assert any('detections with score > 0.3' in note for note in result.notes)
    stored = np.load(tmp_path / 'reference_outputs_roi.npz')
    assert stored['roi_feats'].shape[0] == 100       # test_cfg.rpn.max_per_img

    (boxes, scores, labels), (ref_boxes, ref_scores, ref_labels), _ = \
        _deployed_and_reference(quantized_frcnn, deploy_cfg, model_cfg, result.backend_files)
    assert len(ref_boxes) > 0
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(boxes, ref_boxes, atol=1e-2, rtol=0)
    torch.testing.assert_close(scores, ref_scores, atol=1e-3, rtol=0)


def test_tensorrt_config_exports_and_validates_both_graphs_on_a_cpu(single_thread, tmp_path):
    """mmdeploy refuses device='cpu' for TensorRT configs; the export step needs no GPU, so
    the deploy stops at both validated ONNX graphs (TensorRT is not installed here)."""
    from mmdeploy.utils import load_config

    from mmdet_regptq.deploy import build_detector, quantize_for_deploy
    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy

    symmetric = dict(type='Uniform', per_channel=False, symmetric=True, scale_method='minmax')
    quant = dict(w_bits=8, a_bits=8, first_layer_bits=8, act=symmetric,
                 weight=dict(symmetric, per_channel=True))
    model = build_detector(str(FRCNN), str(CHECKPOINT))
    quantize_for_deploy(model, quant=quant, method=dict(type='MinMax'), input_shape=(192, 192))
    model._regptq_quantized = True
    deploy_cfg, model_cfg = load_config(
        str(ROOT / 'deploy_configs/detection_tensorrt-int8-explicit_static-512x512.py'),
        str(FRCNN))
    deploy_cfg.onnx_config.input_shape = [192, 192]
    result = deploy(deploy_cfg, model_cfg, None, str(VAL_IMAGE), work_dir=tmp_path,
                    model=model)
    assert result.backend_files == []
    assert [Path(f).name for f in result.onnx_files] == ['end2end.onnx', 'end2end_roi.onnx']
    checked = [n for n in result.notes if n.startswith(('end2end.onnx:', 'end2end_roi.onnx:'))]
    assert len(checked) == 2, result.notes
    assert any("'tensorrt' is not installed here" in n for n in result.notes)


def test_mask_and_cascade_heads_are_refused_with_the_reason():
    from torch import nn

    from mmdet_regptq.deploy import build_detector
    from mmdet_regptq.deploy.detectors.two_stage import RoIStage, TwoStageHost, check_deployable

    model = build_detector(str(FRCNN))
    check_deployable(model)                                        # Faster R-CNN deploys
    model.roi_head.mask_head = nn.Identity()                       # now with_mask is True
    with pytest.raises(NotImplementedError, match='mask head is not deployed'):
        RoIStage(model)
    with pytest.raises(NotImplementedError, match='mask head is not deployed'):
        TwoStageHost(model, 100)
    del model.roi_head.mask_head
    model.roi_head.bbox_head = nn.ModuleList([model.roi_head.bbox_head])
    with pytest.raises(NotImplementedError, match='only a single box head'):
        check_deployable(model)
