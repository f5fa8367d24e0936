"""The torch-free two-stage steps (``runtime/two_stage.py``, ``runtime/roi_align.py``)
against mmdet / mmcv on the same inputs."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / 'configs/synthetic/faster-rcnn_r18-16_fpn64_synthetic.py'
CKPT = ROOT / 'checkpoints/faster-rcnn_r18-16_fpn64_synthetic.pth'
IMAGE = ROOT / 'data/synthetic/val/000007.jpg'


@pytest.mark.parametrize('sampling_ratio', [0, 2])
@pytest.mark.parametrize('aligned', [True, False])
def test_numpy_roi_align_equals_mmcv(sampling_ratio, aligned):
    """RoIs of every size (zero-sized, sub-pixel, larger than the map, partly outside), on
    a strided (non-contiguous) map: the NumPy kernel reads each RoI's window in place."""
    from mmcv.ops import roi_align as mmcv_roi_align

    from mmdet_regptq.deploy.runtime.roi_align import roi_align

    rng = np.random.default_rng(0)
    feat = rng.standard_normal((10, 24, 30)).astype(np.float32)[::2]
    assert not feat.flags.c_contiguous
    xy = rng.uniform(-40, 260, (300, 2))
    wh = np.concatenate([rng.uniform(0, 4, (100, 2)), rng.uniform(0, 300, (200, 2))])
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes[:4, 2:] = boxes[:4, :2]
    rois = torch.cat([torch.zeros(len(boxes), 1), torch.from_numpy(boxes)], 1)
    want = mmcv_roi_align(torch.from_numpy(feat.copy())[None], rois, (7, 6), 1 / 8,
                          sampling_ratio, 'avg', aligned).numpy()
    got = roi_align(feat, boxes, (7, 6), 1 / 8, sampling_ratio, aligned)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.fixture(scope='module')
def frcnn(single_thread):
    """The bundled Faster R-CNN, its preprocessed test image and graph 1's raw outputs."""
    import mmdet_regptq  # noqa: F401
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    from mmdet_regptq.deploy import build_detector
    from mmdet_regptq.deploy.detectors.two_stage import RpnStage

    model = build_detector(str(CFG), str(CKPT))
    data = Compose(get_test_pipeline_cfg(model.cfg))(dict(img_path=str(IMAGE), img_id=0))
    batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                         data_samples=[data['data_samples']]), False)
    stage1 = RpnStage(model).eval()
    x = batch['inputs']
    with torch.no_grad():
        raw = dict(zip(stage1.output_names(x), (t.numpy() for t in stage1(x))))
    return model, x, raw


def _post(model, x, rpn_cfg=None):
    from mmdet_regptq.deploy.detectors.spec import two_stage_postprocess_spec
    from mmdet_regptq.deploy.runtime.two_stage import TwoStagePostProcessor

    if rpn_cfg:
        model = copy.deepcopy(model)
        model.rpn_head.test_cfg.update(rpn_cfg)
    spec, priors = two_stage_postprocess_spec(model, x.shape[-2:], num_rois=100)
    return model, TwoStagePostProcessor(spec, priors)


@pytest.mark.parametrize('rpn_cfg', [None, dict(nms_pre=120, min_bbox_size=6, max_per_img=40,
                                                nms=dict(type='nms', iou_threshold=0.5))])
def test_numpy_rpn_proposals_equal_predict_by_feat(frcnn, rpn_cfg):
    """Per-level top ``nms_pre``, decoding, size filter, NMS per level, ``max_per_img``:
    the proposals of mmdet's ``RPNHead.predict_by_feat`` on the same raw outputs."""
    from mmdet_regptq.deploy.detectors.raw import unflatten_raw

    model, x, raw = frcnn
    model, post = _post(model, x, rpn_cfg)
    _, scores, deltas = unflatten_raw({k: torch.from_numpy(v) for k, v in raw.items()})
    meta = dict(img_shape=tuple(x.shape[-2:]))
    with torch.no_grad():
        want = model.rpn_head.predict_by_feat(scores, deltas, batch_img_metas=[meta],
                                              rescale=False)[0].bboxes.numpy()
    got = post.proposals(raw)
    cap = (rpn_cfg or {}).get('max_per_img', model.rpn_head.test_cfg['max_per_img'])
    assert len(got) == len(want) == cap      # the max_per_img cut binds
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_numpy_roi_features_and_detections_equal_mmdet(frcnn):
    """``SingleRoIExtractor`` (level per RoI scale) and ``BBoxHead.predict_by_feat`` +
    ``multiclass_nms`` in NumPy on mmdet's own proposals. ``finest_scale`` 14 instead of 56
    spreads the small RoIs of a 192x192 image over the four levels."""
    from mmdet.structures.bbox import bbox2roi

    model, x, raw = frcnn
    model = copy.deepcopy(model)
    model.roi_head.bbox_roi_extractor.finest_scale = 14
    model, post = _post(model, x)
    proposals = post.proposals(raw)
    feats = tuple(torch.from_numpy(raw[f'raw0_{i}']) for i in range(5))
    extractor = model.roi_head.bbox_roi_extractor
    rois = bbox2roi([torch.from_numpy(proposals)])
    levels = extractor.map_roi_levels(rois, extractor.num_inputs)
    assert len(set(levels.tolist())) >= 3          # RoIs on several levels
    with torch.no_grad():
        want_feats = extractor(feats[:extractor.num_inputs], rois)
        cls_score, bbox_pred = model.roi_head.bbox_head(want_feats)
        want = model.roi_head.bbox_head.predict_by_feat(
            (rois,), (cls_score,), (bbox_pred,), batch_img_metas=[dict(
                img_shape=tuple(x.shape[-2:]))], rcnn_test_cfg=model.roi_head.test_cfg,
            rescale=False)[0]
    got_feats = post.roi_features(raw, proposals)
    np.testing.assert_allclose(got_feats, want_feats.numpy(), rtol=0, atol=1e-4)
    dets, labels = post.detections(proposals, cls_score.numpy(), bbox_pred.numpy())
    assert len(dets) == len(want.bboxes) > 0
    np.testing.assert_array_equal(labels, want.labels.numpy())
    np.testing.assert_allclose(dets[:, :4], want.bboxes.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dets[:, 4], want.scores.numpy(), rtol=1e-5, atol=1e-6)


def test_two_stage_spec_refuses_max_pooling(frcnn):
    from mmdet_regptq.deploy.detectors.spec import two_stage_postprocess_spec

    model, x, _ = frcnn
    model = copy.deepcopy(model)
    for layer in model.roi_head.bbox_roi_extractor.roi_layers:
        layer.pool_mode = 'max'
    with pytest.raises(NotImplementedError, match='average pooling'):
        two_stage_postprocess_spec(model, x.shape[-2:], num_rois=100)
