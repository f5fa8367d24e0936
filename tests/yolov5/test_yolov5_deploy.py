"""The real YOLOv5n deployed end to end at 640x640: the torch-free runtime's letterbox,
its NumPy post-processor and the ONNX Runtime artifact against mmdet's own pipeline and
``predict`` on COCO val images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from yolov5_utils import ROOT, build_model, coco128_config

SHAPE = (640, 640)
#: a landscape and a portrait val image (padded top / bottom and left / right)
IMAGE_NAMES = ('000000000139.jpg', '000000000285.jpg')


@pytest.fixture(scope='module')
def images(realdata: Path) -> list[Path]:
    return [realdata / 'coco128_val2017' / 'images' / 'val2017' / n for n in IMAGE_NAMES]


@pytest.fixture(scope='module')
def fp_model(converted: Path, single_thread):
    """The converted YOLOv5n whose test pipeline letterboxes onto the 640x640 canvas, as
    the deployed graph's input (``static_letterbox``)."""
    from mmengine.runner import load_checkpoint

    from mmdet_regptq.deploy.detectors.spec import static_letterbox

    cfg = static_letterbox(coco128_config(), SHAPE)
    model = build_model(cfg)
    load_checkpoint(model, str(converted), map_location='cpu', strict=True)
    model.cfg = cfg      # inference_detector's pipeline
    return model


def _pipeline_inputs(model, image: Path) -> tuple[torch.Tensor, dict]:
    """mmdet's test pipeline + data preprocessor: the network input and its metainfo."""
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    data = Compose(get_test_pipeline_cfg(model.cfg))(dict(img_path=str(image), img_id=0))
    batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                         data_samples=[data['data_samples']]), False)
    return batch['inputs'], batch['data_samples'][0].metainfo


def _predict(model, image: Path) -> tuple[np.ndarray, ...]:
    from mmdet.apis import inference_detector

    with torch.no_grad():
        dets = inference_detector(model, str(image)).pred_instances
    return dets.bboxes.numpy(), dets.scores.numpy(), dets.labels.numpy()


def _rows(boxes, scores, labels) -> np.ndarray:
    """Detections as rows sorted by (label, score, box): equal scores may come out of
    two NMS implementations in either order."""
    table = np.concatenate([np.asarray(labels, np.float32).reshape(-1, 1),
                            np.asarray(scores, np.float32).reshape(-1, 1),
                            np.asarray(boxes, np.float32).reshape(-1, 4)], 1)
    return table[np.lexsort(table.T[::-1])]


def _assert_same(got: tuple, want: tuple, rtol: float, score_atol: float = 1e-6) -> None:
    """Same count, same labels, boxes within ``rtol`` (relative, 1 px absolute floor)."""
    assert len(got[0]) == len(want[0]) > 0
    got, want = _rows(*got), _rows(*want)
    np.testing.assert_array_equal(got[:, 0], want[:, 0])
    np.testing.assert_allclose(got[:, 1], want[:, 1], atol=score_atol)
    np.testing.assert_allclose(got[:, 2:], want[:, 2:], rtol=rtol, atol=rtol)


def test_runtime_letterbox_is_mmdets_pipeline(fp_model, images):
    """``Preprocess`` (NumPy + OpenCV) gives the tensor of mmdet's ``YOLOv5Letterbox`` +
    ``DetDataPreprocessor``, and the padding / scale that map the boxes back."""
    from mmdet_regptq.deploy.detectors.spec import preprocess_spec
    from mmdet_regptq.deploy.runtime.preprocess import Preprocess

    spec = preprocess_spec(fp_model.cfg, SHAPE)
    assert spec['type'] == 'letterbox' and spec['pad_val'] == 114 and spec['scale'] == 640
    pre = Preprocess(spec)
    for image in images:
        want, meta = _pipeline_inputs(fp_model, image)
        got = pre(pre.load(str(image)))
        assert got.tensor.shape == tuple(want.shape) == (1, 3, *SHAPE)
        np.testing.assert_allclose(got.tensor, want.numpy(), rtol=0, atol=1e-5)
        top, _, left, _ = meta['pad_param']
        assert got.pad == (top, left) and max(top, left) > 0      # centred, not at the corner
        np.testing.assert_allclose(got.scale_factor, meta['scale_factor'])


def test_letterbox_larger_than_the_graph_is_refused(fp_model):
    from mmdet_regptq.deploy.detectors.spec import preprocess_spec

    with pytest.raises(ValueError, match=r'scale=640 does not fit .*input_shape'):
        preprocess_spec(fp_model.cfg, (320, 320))


@pytest.mark.parametrize('multi_label', [True, False])
def test_numpy_post_processor_and_graph_give_the_heads_predict(fp_model, images, multi_label,
                                                              monkeypatch):
    """On the same raw head outputs of a real image: ``YOLOv5PostProcessor`` (NumPy, what
    ``tvm_int4`` runs) == ``YOLOv5End2End`` (the ONNX graph's module) ==
    ``YOLOv5Head.predict_by_feat`` (boxes in the letterboxed input); Ultralytics'
    multi-label validation setting and the best class per box."""
    from mmdet_regptq.deploy.detectors.raw import RawDetector, raw_output_names
    from mmdet_regptq.deploy.detectors.spec import postprocess_spec
    from mmdet_regptq.deploy.mmdeploy.end2end import end2end_graph
    from mmdet_regptq.deploy.runtime.postprocess import make_post_processor

    model = fp_model
    monkeypatch.setitem(model.bbox_head.test_cfg, 'multi_label', multi_label)
    x, meta = _pipeline_inputs(model, images[0])
    with torch.no_grad():
        raw = dict(zip(raw_output_names(model, x), (t.numpy() for t in RawDetector(model)(x))))
        maps = model.bbox_head(model.extract_feat(x))[0]
        want = model.bbox_head.predict_by_feat(maps, [meta], rescale=False)[0]
        dets, labels = end2end_graph(model, SHAPE)(x)
    spec, priors = postprocess_spec(model, SHAPE)
    assert spec['kind'] == 'yolov5' and spec['test_cfg']['multi_label'] is multi_label
    got_dets, got_labels = make_post_processor(spec, priors)(raw)
    want = (want.bboxes.numpy(), want.scores.numpy(), want.labels.numpy())
    assert len(want[0]) == 300      # a busy real image: max_per_img binds
    _assert_same((got_dets[:, :4], got_dets[:, 4], got_labels), want, rtol=1e-3)
    _assert_same((dets[0, :, :4], dets[0, :, 4], labels[0]), want, rtol=1e-3)


def _deploy(model, deploy_cfg: str, work_dir: Path, image: Path):
    from mmdeploy.utils import load_config

    from mmdet_regptq.deploy.mmdeploy.pipeline import deploy

    deploy_cfg, model_cfg = load_config(str(ROOT / 'deploy_configs' / deploy_cfg),
                                        str(ROOT / 'configs/yolov5/yolov5_n_coco128.py'))
    return deploy(deploy_cfg, model_cfg, None, str(image), work_dir=work_dir, model=model)


def test_onnxruntime_artifact_runs_without_torch_and_matches_predict(fp_model, images,
                                                                    tmp_path,
                                                                    run_without_torch):
    """YOLOv5n as one 640x640 ORT graph (letterbox in the runtime; decoding, TopK, NMS in
    the graph), run by ``python -m mmdet_regptq.deploy.run`` where torch and mmdet cannot
    be imported, gives mmdet's ``predict`` in the image's pixels."""
    import json

    import onnx

    work = tmp_path / 'work'
    result = _deploy(fp_model, 'detection_onnxruntime_end2end_static-640x640.py', work,
                     images[0])
    graph = onnx.load(str(work / 'end2end.onnx'))
    assert {'NonMaxSuppression', 'TopK', 'NonZero'} <= {n.op_type for n in graph.graph.node}
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == \
        [1, 3, *SHAPE]
    assert any('same labels' in note for note in result.notes), result.notes
    spec = json.loads((work / 'spec.json').read_text())
    assert spec['preprocess']['type'] == 'letterbox' and len(spec['classes']) == 80
    found = run_without_torch(work, images)
    for image in images:
        dets = found[str(image)]
        got = (np.asarray([d['bbox'] for d in dets], np.float32).reshape(-1, 4),
               np.asarray([d['score'] for d in dets], np.float32),
               np.asarray([d['label'] for d in dets], np.int64))
        boxes, scores, labels = _predict(fp_model, image)
        # the JSON keeps 2 decimals of a box and 4 of a score
        _assert_same(got, (boxes, np.round(scores, 4), labels), rtol=1e-3, score_atol=1e-4)
