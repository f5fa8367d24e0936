"""End-to-end graphs (image → dets + labels) and the torch-free runtime."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DETECTORS = {name: (ROOT / f'configs/synthetic/{name}_r18-16_fpn64_synthetic.py',
                    ROOT / f'checkpoints/{name}_r18-16_fpn64_synthetic.pth')
             for name in ('retinanet', 'fcos', 'faster-rcnn')}
IMAGES = [ROOT / f'data/synthetic/val/{i:06d}.jpg' for i in (3, 7)]


@pytest.fixture(scope='module')
def quantized(single_thread):
    """``quantized(name)``: a bundled detector, W4A4 MinMax-calibrated (cached)."""
    import mmdet_regptq  # noqa: F401
    from mmdet_regptq.deploy import build_detector, quantize_for_deploy

    cache = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cfg, ckpt = DETECTORS[name]
            model = build_detector(str(cfg), str(ckpt))
            quantize_for_deploy(model, quant=dict(w_bits=4, a_bits=4),
                                method=dict(type='MinMax'), input_shape=(192, 192))
            model._regptq_quantized = True
            cache[name] = model
        return cache[name]
    return get


def _predict(model: torch.nn.Module, image: Path) -> tuple[np.ndarray, ...]:
    """mmdet's ``predict`` of the fake-quant model (boxes in the image's pixels)."""
    from mmdet.apis import inference_detector

    with torch.no_grad():
        dets = inference_detector(model, str(image)).pred_instances
    return dets.bboxes.numpy(), dets.scores.numpy(), dets.labels.numpy()


def _assert_same(got: tuple, want: tuple, rtol: float) -> None:
    boxes, scores, labels = got
    ref_boxes, ref_scores, ref_labels = want
    assert len(boxes) == len(ref_boxes) > 0
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(boxes, ref_boxes, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(scores, ref_scores, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize('name', list(DETECTORS))
def test_end2end_module_gives_mmdet_predict(quantized, name):
    """The traced module's eager output is mmdet's predict (same candidates, same NMS)."""
    from mmdet_regptq.deploy.mmdeploy.end2end import end2end_graph

    model = quantized(name)
    graph = end2end_graph(model, (192, 192))
    data = model.data_preprocessor(_pipeline_data(model, IMAGES[0]), False)
    with torch.no_grad():
        dets, labels = graph(data['inputs'])
    want = _predict(model, IMAGES[0])
    _assert_same((dets[0, :, :4].numpy(), dets[0, :, 4].numpy(), labels[0].numpy()), want,
                 rtol=1e-5)


def _pipeline_data(model: torch.nn.Module, image: Path) -> dict:
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    pipeline = Compose(get_test_pipeline_cfg(model.cfg))
    data = pipeline(dict(img_path=str(image), img_id=0))
    return dict(inputs=[data['inputs']], data_samples=[data['data_samples']])


def _deploy(model, name: str, deploy_cfg: str, work_dir: Path):
    from mmdeploy.utils import load_config

    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy

    deploy_cfg, model_cfg = load_config(str(ROOT / 'deploy_configs' / deploy_cfg),
                                        str(DETECTORS[name][0]))
    if 'regptq' in deploy_cfg and 'calib_images' in deploy_cfg.regptq:
        deploy_cfg.regptq.calib_images = 2
    return deploy(deploy_cfg, model_cfg, None, str(IMAGES[0]), work_dir=work_dir, model=model)


def _as_arrays(dets: list[dict]) -> tuple[np.ndarray, ...]:
    return (np.asarray([d['bbox'] for d in dets], np.float32).reshape(-1, 4),
            np.asarray([d['score'] for d in dets], np.float32),
            np.asarray([d['label'] for d in dets], np.int64))


@pytest.fixture(scope='module')
def float_model(single_thread):
    """``float_model(name)``: a bundled detector as trained (cached)."""
    import mmdet_regptq  # noqa: F401
    from mmdet_regptq.deploy import build_detector

    cache = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cfg, ckpt = DETECTORS[name]
            cache[name] = build_detector(str(cfg), str(ckpt))
        return cache[name]
    return get


@pytest.mark.parametrize('name', ['retinanet', 'faster-rcnn'])
def test_onnxruntime_end2end_runs_without_torch_and_matches_predict(float_model, name,
                                                                   tmp_path, run_without_torch):
    """One FP32 ORT graph, run by the torch-free runtime, gives the model's detections
    (float sums in another order: equal within 1e-3)."""
    model = float_model(name)
    work = tmp_path / 'work'
    result = _deploy(model, name, 'detection_onnxruntime_end2end_static-192x192.py', work)
    graph = onnx.load(str(work / 'end2end.onnx'))
    ops = {n.op_type for n in graph.graph.node}
    assert {'NonMaxSuppression', 'TopK', 'NonZero'} <= ops
    assert ('RoiAlign' in ops) == (name == 'faster-rcnn')
    assert [o.name for o in graph.graph.output] == ['dets', 'labels']
    assert any('same labels' in note for note in result.notes), result.notes
    found = run_without_torch(work, IMAGES)
    for image in IMAGES:
        want = _predict(model, image)
        # the JSON keeps 2 decimals of a box and 4 of a score
        _assert_same(_as_arrays(found[str(image)]), (want[0], np.round(want[1], 4), want[2]),
                     rtol=1e-3)


def test_onnxruntime_int8_end2end_two_stage_finds_the_fake_quant_detections(quantized,
                                                                            tmp_path):
    """Faster R-CNN as ONE ORT INT8 graph (QLinearConv; its requantization rounds
    differently, so not bit-exact) finds the fake-quant model's confident detections."""
    from mmdet.structures.bbox import bbox_overlaps

    from mmdet_regptq.deploy.runtime.detector import Detector

    model = quantized('faster-rcnn')
    work = tmp_path / 'work'
    _deploy(model, 'faster-rcnn', 'detection_onnxruntime-int8_end2end_static-192x192.py', work)
    ops = {n.op_type for n in onnx.load(str(work / 'end2end.onnx')).graph.node}
    assert {'QLinearConv', 'RoiAlign', 'NonMaxSuppression'} <= ops or \
        {'DequantizeLinear', 'RoiAlign', 'NonMaxSuppression'} <= ops
    detector = Detector(work, threads=1)
    for image in IMAGES:
        found = detector(image)
        boxes, scores, labels = _predict(model, image)
        confident = scores > 0.5
        assert confident.sum() > 0
        iou = bbox_overlaps(torch.from_numpy(boxes[confident]), torch.from_numpy(found.boxes))
        same = torch.from_numpy(labels[confident][:, None] == found.labels[None])
        assert ((iou > 0.8) & same).any(dim=1).float().mean() >= 0.8


def _assert_wrapper_runs_the_work_dir(result, work: Path) -> None:
    """mmdeploy's wrapper of the backend files (what ``End2EndModel`` evaluates), asked for
    ``dets`` / ``labels``, gives the torch-free runtime's detections."""
    from mmdeploy.backend.base import get_backend_manager

    from mmdet_regptq.deploy.runtime.detector import Detector

    x = np.load(work / 'reference_end2end.npz')['input']
    wrapper = get_backend_manager('tvm_int4').build_wrapper(result.backend_files, 'cpu',
                                                            output_names=['dets', 'labels'])
    outs = wrapper({'input': torch.from_numpy(x)})
    dets, labels = Detector(work).run(x)
    assert outs['dets'].shape == (1, len(dets), 5) and len(dets) > 0
    np.testing.assert_array_equal(outs['dets'][0].numpy(), dets)
    np.testing.assert_array_equal(outs['labels'][0].numpy(), labels)


def _assert_tvm_work_dir_gives_predict(model, result, work, run_without_torch) -> None:
    """The mmdeploy wrapper and the torch-free runtime of a TVM work dir both give the
    fake-quant model's detections (boxes within 1e-3 relative)."""
    _assert_wrapper_runs_the_work_dir(result, work)
    found = run_without_torch(work, IMAGES)
    for image in IMAGES:
        want = _predict(model, image)
        got = _as_arrays(found[str(image)])
        _assert_same(got, (want[0], np.round(want[1], 4), want[2]), rtol=1e-3)


def test_tvm_int4_end2end_runs_without_torch_and_matches_predict(quantized, tmp_path,
                                                                run_without_torch):
    """TVM INT4 (raw graph) + the NumPy post-processor, run without torch."""
    model = quantized('fcos')
    work = tmp_path / 'work'
    result = _deploy(model, 'fcos', 'detection_tvm-int4_end2end_static-192x192.py', work)
    spec = json.loads((work / 'spec.json').read_text())
    assert spec['backend'] == 'tvm_int4' and spec['postprocess']['score_factors']
    assert any('same labels' in note for note in result.notes), result.notes
    _assert_tvm_work_dir_gives_predict(model, result, work, run_without_torch)


def test_tensorrt_end2end_graph_has_the_efficient_nms_plugin(single_thread, tmp_path):
    """TensorRT config: explicit-Q/DQ graph + EfficientNMS_TRT; stops at the ONNX
    file with a clear note where TensorRT is not installed."""
    import mmdet_regptq  # noqa: F401
    from mmdet_regptq.deploy import build_detector, quantize_for_deploy

    torch.manual_seed(0)
    cfg, ckpt = DETECTORS['retinanet']
    model = build_detector(str(cfg), str(ckpt))
    sym = dict(type='Uniform', symmetric=True, scale_method='minmax')
    quantize_for_deploy(model, quant=dict(w_bits=8, a_bits=8, weight=dict(sym, per_channel=True),
                                          act=dict(sym, per_channel=False)),
                        method=dict(type='MinMax'), input_shape=(192, 192))
    model._regptq_quantized = True
    from mmdeploy.utils import load_config
    deploy_cfg = load_config(
        str(ROOT / 'deploy_configs/detection_tensorrt-int8-explicit_end2end_static-512x512.py'))[0]
    assert deploy_cfg.onnx_config.output_names == ['dets', 'labels']
    result = _deploy(model, 'retinanet',
                     'detection_tensorrt-int8-explicit_end2end_static-512x512.py', tmp_path)
    graph = onnx.load(result.onnx_file)
    nms = [n for n in graph.graph.node if n.op_type == 'EfficientNMS_TRT']
    assert len(nms) == 1 and nms[0].domain == 'TRT'
    assert {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim]
            for o in graph.graph.output} == {'dets': [1, 100, 5], 'labels': [1, 100]}
    assert not any(n.op_type == 'NonMaxSuppression' for n in graph.graph.node)
    assert any('TensorRT explicit quantization: OK' in n for n in result.notes), result.notes
    assert any("backend 'tensorrt' is not installed" in n for n in result.notes)


def test_tvm_int4_end2end_two_stage_runs_without_torch_and_matches_predict(quantized,
                                                                          tmp_path,
                                                                          run_without_torch):
    """Faster R-CNN on TVM INT4 as one work dir: two integer artifacts (graph 1: features +
    RPN outputs; graph 2: the box head on a static RoI count) with the NumPy RPN proposals,
    RoIAlign and box decoding + NMS around them, run without torch: mmdet's detections."""
    model = quantized('faster-rcnn')
    work = tmp_path / 'work'
    result = _deploy(model, 'faster-rcnn', 'detection_tvm-int4_end2end_static-192x192.py',
                     work)
    spec = json.loads((work / 'spec.json').read_text())
    assert spec['backend'] == 'tvm_int4' and spec['postprocess']['kind'] == 'two_stage'
    assert spec['postprocess']['num_rois'] == model.rpn_head.test_cfg['max_per_img']
    assert (work / spec['model'] / 'model.so').is_file()
    assert (work / spec['roi_model'] / 'model.so').is_file()
    assert any('same labels' in note for note in result.notes), result.notes
    _assert_tvm_work_dir_gives_predict(model, result, work, run_without_torch)


def test_yolov5_end2end_graph_gives_the_heads_predict_in_ort(single_thread, tmp_path):
    """YOLOv5n (random weights: thousands of candidates reach NMS) as one ORT graph gives
    ``YOLOv5Head.predict_by_feat`` in the letterboxed input's pixels."""
    import onnxruntime as ort
    from mmdet.registry import MODELS
    from mmengine.config import Config

    from mmengine.registry import init_default_scope

    import mmdet_regptq  # noqa: F401  (YOLOv5 in mmdet's registries)
    from mmdet_regptq.deploy import export_onnx
    from mmdet_regptq.deploy.mmdeploy.end2end import end2end_graph

    torch.manual_seed(0)
    init_default_scope('mmdet')
    cfg = Config.fromfile(str(ROOT / 'configs/yolov5/yolov5_n_coco.py'))
    model = MODELS.build(cfg.model).eval()
    for conv in model.bbox_head.convs_pred:     # spread the scores (init: all tiny)
        torch.nn.init.normal_(conv.bias, 0.0, 1.5)
    model.bbox_head.test_cfg.update(score_thr=0.3, nms_pre=2000)   # a quick, binding case
    x = torch.randn(1, 3, 160, 224)
    graph = end2end_graph(model, (160, 224))
    meta = dict(img_shape=(160, 224), ori_shape=(160, 224), scale_factor=(1.0, 1.0))
    with torch.no_grad():
        want = model.bbox_head.predict_by_feat(model.bbox_head(model.extract_feat(x))[0],
                                               [meta], rescale=False)[0]
        dets, labels = graph(x)
    assert 0 < len(want.scores) == dets.shape[1]

    def rows(boxes, scores, labels):   # equal scores may come out in either order
        table = np.concatenate([np.asarray(boxes).reshape(-1, 4),
                                np.asarray(scores).reshape(-1, 1),
                                np.asarray(labels).reshape(-1, 1)], 1)
        return table[np.lexsort(table.T[::-1])]
    np.testing.assert_allclose(rows(dets[0, :, :4], dets[0, :, 4], labels[0]),
                               rows(want.bboxes, want.scores, want.labels), rtol=1e-5,
                               atol=1e-4)
    path = tmp_path / 'yolov5n.onnx'
    export_onnx(graph, x, path, output_names=['dets', 'labels'],
                dynamic_axes={'dets': {1: 'n'}, 'labels': {1: 'n'}})
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    ort_dets, ort_labels = sess.run(None, {'input': x.numpy()})
    assert ort_dets.shape == tuple(dets.shape)
    np.testing.assert_allclose(rows(ort_dets[0, :, :4], ort_dets[0, :, 4], ort_labels[0]),
                               rows(dets[0, :, :4], dets[0, :, 4], labels[0]), rtol=1e-4,
                               atol=1e-3)


@pytest.mark.parametrize('name', ['retinanet', 'fcos'])
def test_numpy_post_processor_gives_the_graphs_detections(float_model, name):
    """The NumPy post-processor of the TVM artifacts (9 anchors per position on RetinaNet,
    centerness on FCOS) on raw outputs = the end-to-end module on the same outputs."""
    from mmdet_regptq.deploy.detectors.raw import RawDetector, raw_output_names
    from mmdet_regptq.deploy.detectors.spec import dense_postprocess_spec
    from mmdet_regptq.deploy.mmdeploy.end2end import end2end_graph
    from mmdet_regptq.deploy.runtime.postprocess import DensePostProcessor

    model = float_model(name)
    x = model.data_preprocessor(_pipeline_data(model, IMAGES[1]), False)['inputs']
    with torch.no_grad():
        raw = dict(zip(raw_output_names(model, x), (t.numpy() for t in RawDetector(model)(x))))
        dets, labels = end2end_graph(model, (192, 192))(x)
    got_dets, got_labels = DensePostProcessor(*dense_postprocess_spec(model, (192, 192)))(raw)
    assert len(got_dets) == dets.shape[1] > 0
    np.testing.assert_array_equal(np.sort(got_labels), np.sort(labels[0].numpy()))
    order, ref_order = np.lexsort(got_dets.T[::-1]), np.lexsort(dets[0].numpy().T[::-1])
    np.testing.assert_allclose(got_dets[order], dets[0].numpy()[ref_order], rtol=1e-4,
                               atol=1e-3)


@pytest.mark.parametrize('argv, expected', [
    (['python', '-m', 'mmdet_regptq.deploy.run', 'work', 'a.jpg'], True),
    (['python', '-X', 'importtime', '-W', 'ignore', '-m', 'mmdet_regptq.deploy.run'], True),
    (['python', '-m' + 'mmdet_regptq.deploy.run', 'work'], True),
    (['python', '-m', 'mmdet_regptq.deploy.onnx.avx2_shim', 'work_dirs/shim'], True),
    (['python', '-m', 'mmdet_regptq.deploy.onnx'], False),
    (['python', '-m', 'pytest', 'tests'], False),
    (['python', 'tools/deploy.py', '-m', 'mmdet_regptq.deploy.run'], False),
    (['python', '-c', 'import mmdet_regptq'], False)])
def test_only_the_light_entries_skip_the_torch_imports(monkeypatch, argv, expected):
    from mmdet_regptq._runtime_entry import runtime_only

    monkeypatch.setattr(sys, 'orig_argv', argv)
    assert runtime_only() is expected
