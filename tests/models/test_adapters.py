"""Detector adapters on random-init models from mmdet's own zoo configs (no download).

Each config is shrunk (ResNet-18, narrow necks/heads, few proposals / decoder layers) so a
model builds and runs in well under a second; the decoding code paths are those of the
full-size models. Inputs: two images of different sizes (96x128, 128x112).
"""
import os

import mmdet
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmdet_regptq.calib import FGICConfig
from mmdet_regptq.models import (DenseHeadAdapter, DETRAdapter, RawOutputs, TwoStageAdapter,
                                 find_adapter)
from mmdet_regptq.models.dense import DENSE_DECODERS, find_dense_decoder

ZOO = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs')
SIZES = [(96, 128), (128, 112)]

_R18 = {'backbone.depth': 18, 'neck.in_channels': [64, 128, 256, 512], 'neck.out_channels': 32}
_HEAD = {'bbox_head.in_channels': 32, 'bbox_head.feat_channels': 32, 'bbox_head.stacked_convs': 1}
_RCNN = {**_R18, 'rpn_head.in_channels': 32, 'rpn_head.feat_channels': 32,
         'roi_head.bbox_roi_extractor.out_channels': 32, 'roi_head.bbox_head.in_channels': 32,
         'roi_head.bbox_head.fc_out_channels': 64}
#: config → (overrides of ``model``, adapter class, decoder of the dense head or None)
ZOO_MODELS = {
    'retinanet/retinanet_r50_fpn_1x_coco.py': ({**_R18, **_HEAD}, DenseHeadAdapter, 'BaseDenseHead'),
    'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py': ({**_R18, **_HEAD}, DenseHeadAdapter,
                                                   'BaseDenseHead'),
    'atss/atss_r50_fpn_1x_coco.py': ({**_R18, **_HEAD}, DenseHeadAdapter, 'BaseDenseHead'),
    'gfl/gfl_r50_fpn_1x_coco.py': ({**_R18, **_HEAD}, DenseHeadAdapter, 'GFLHead'),
    'yolof/yolof_r50-c5_8xb8-1x_coco.py': (
        {'backbone.depth': 18, 'neck.in_channels': 512, 'neck.out_channels': 32,
         'neck.block_mid_channels': 16, 'neck.num_residual_blocks': 1,
         'neck.block_dilations': [2], 'bbox_head.in_channels': 32}, DenseHeadAdapter,
        'BaseDenseHead'),
    'rtmdet/rtmdet_tiny_8xb32-300e_coco.py': ({}, DenseHeadAdapter, 'BaseDenseHead'),
    'yolox/yolox_tiny_8xb8-300e_coco.py': ({}, DenseHeadAdapter, 'YOLOXHead'),
    'yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py': ({}, DenseHeadAdapter, 'YOLOV3Head'),
    'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py': (_RCNN, TwoStageAdapter, None),
    'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py': (
        {**_RCNN, 'roi_head.mask_roi_extractor.out_channels': 32,
         'roi_head.mask_head.in_channels': 32, 'roi_head.mask_head.conv_out_channels': 32,
         'roi_head.mask_head.num_convs': 1}, TwoStageAdapter, None),
    'detr/detr_r50_8xb2-150e_coco.py': (
        {'backbone.depth': 18, 'neck.in_channels': [512], 'encoder.num_layers': 1,
         'decoder.num_layers': 2}, DETRAdapter, None),
}


def _no_init_cfg(cfg):
    """Drop every ``init_cfg`` (pretrained weights are never downloaded)."""
    if isinstance(cfg, dict):
        if 'init_cfg' in cfg:
            cfg['init_cfg'] = None
        for value in cfg.values():
            _no_init_cfg(value)
    elif isinstance(cfg, list):
        for value in cfg:
            _no_init_cfg(value)


def build_zoo_model(rel_path, overrides):
    init_default_scope('mmdet')
    cfg = Config.fromfile(os.path.join(ZOO, rel_path))
    cfg.merge_from_dict({f'model.{k}': v for k, v in overrides.items()})
    _no_init_cfg(cfg.model)
    torch.manual_seed(0)
    return MODELS.build(cfg.model).eval()


def make_data(sizes=SIZES):
    gen = torch.Generator().manual_seed(0)
    return dict(
        inputs=[(torch.rand(3, *s, generator=gen) * 255).to(torch.uint8) for s in sizes],
        data_samples=[DetDataSample(metainfo=dict(img_shape=s, ori_shape=s,
                                                  scale_factor=(1.0, 1.0))) for s in sizes])


pytestmark = pytest.mark.usefixtures('single_thread')


def _num_priors(head, maps):
    return sum(m.shape[-2] * m.shape[-1] for m in maps) * head.prior_generator.num_base_priors[0]


def _expected_counts(adapter, raw):
    """Stage → number of predictions per image: priors, proposals or queries."""
    model = adapter.model
    if isinstance(adapter, DenseHeadAdapter):
        return {'det': [_num_priors(model.bbox_head, raw.outputs[0])] * 2}
    if isinstance(adapter, TwoStageAdapter):
        rpn = _num_priors(model.rpn_head, raw.outputs[0][0])
        return {'rpn': [rpn] * 2, 'roi': [int((raw.rois[:, 0] == i).sum()) for i in range(2)]}
    return {'det': [model.num_queries] * 2}


@pytest.mark.parametrize('rel_path', list(ZOO_MODELS))
def test_zoo_model_forward_and_decode(rel_path):
    overrides, adapter_cls, decoder = ZOO_MODELS[rel_path]
    model = build_zoo_model(rel_path, overrides)
    options = {'max_proposals': 12} if adapter_cls is TwoStageAdapter else {}
    adapter = find_adapter(model, **options)
    assert type(adapter) is adapter_cls
    if decoder is not None:
        assert find_dense_decoder(model.bbox_head) is DENSE_DECODERS.get(decoder)
    batch = adapter.prepare_batch(make_data())
    with torch.no_grad():
        raw = adapter.forward(model, batch)
        stages = adapter.decode_stages(raw)
    assert isinstance(raw, RawOutputs) and raw.img_shapes.tolist() == [list(s) for s in SIZES]
    counts = _expected_counts(adapter, raw)
    assert set(stages) == set(counts)
    for stage, preds in stages.items():
        assert [p.scores.shape[0] for p in preds] == counts[stage], stage
        for pred, (h, w) in zip(preds, SIZES):
            scores, boxes = pred.scores, pred.boxes
            assert pred.img_shape == (h, w) and boxes.shape[-1] == 4
            assert boxes.shape[0] == scores.shape[0]
            assert torch.isfinite(scores).all() and scores.min() >= 0 and scores.max() <= 1
            assert torch.isfinite(boxes).all() and boxes.min() >= 0
            assert boxes[..., 0::2].max() <= w and boxes[..., 1::2].max() <= h
            if not pred.sigmoid:   # softmax with the background last
                assert torch.allclose(scores.sum(-1), torch.ones(len(scores)), atol=1e-4)
    final = adapter.decode(raw)
    assert all(torch.equal(a.boxes, b.boxes) for a, b in zip(final, stages[adapter.final_stage]))
    logits = adapter.logits(raw)
    assert logits.dim() == 2 and torch.isfinite(logits).all()
    loss = adapter.global_loss(FGICConfig())(raw, raw)
    assert abs(float(loss)) < 1e-4                        # identical outputs: L_G = 0


def _names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d,
                                                                  torch.nn.Linear))]


def _matching(patterns, names):
    import re
    return [n for n in names if any(re.fullmatch(p, n) for p in patterns)]


def test_head_and_regression_patterns_dense_two_stage_detr():
    retina = build_zoo_model('retinanet/retinanet_r50_fpn_1x_coco.py', {**_R18, **_HEAD})
    adapter = find_adapter(retina)
    names = _names(retina)
    reg = _matching(adapter.regression_layer_patterns(), names)
    head = _matching(adapter.head_layer_patterns(), names)
    assert reg == ['bbox_head.reg_convs.0.conv', 'bbox_head.retina_reg']
    assert head == [n for n in names if n.startswith('bbox_head.')] and len(head) == 4

    yolox = build_zoo_model('yolox/yolox_tiny_8xb8-300e_coco.py', {})
    reg = _matching(find_adapter(yolox).regression_layer_patterns(), _names(yolox))
    assert reg and all('reg' in n for n in reg) and not any('obj' in n for n in reg)

    faster = build_zoo_model('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', _RCNN)
    adapter = find_adapter(faster)
    reg = _matching(adapter.regression_layer_patterns(), _names(faster))
    assert reg == ['rpn_head.rpn_conv', 'rpn_head.rpn_reg', 'roi_head.bbox_head.fc_reg',
                   'roi_head.bbox_head.shared_fcs.0', 'roi_head.bbox_head.shared_fcs.1']
    head = _matching(adapter.head_layer_patterns(), _names(faster))
    assert 'roi_head.bbox_head.fc_cls' in head and 'rpn_head.rpn_cls' in head

    detr = build_zoo_model('detr/detr_r50_8xb2-150e_coco.py', ZOO_MODELS[
        'detr/detr_r50_8xb2-150e_coco.py'][0])
    adapter = find_adapter(detr)
    reg = _matching(adapter.regression_layer_patterns(), _names(detr))
    assert reg and all(n.startswith('bbox_head.') and 'reg' in n for n in reg)
    head = _matching(adapter.head_layer_patterns(), _names(detr))
    assert any(n.startswith('encoder.') for n in head) and not any(
        n.startswith('backbone.') for n in head)


def test_two_stage_proposals_are_fixed_and_outputs_aligned():
    model = build_zoo_model('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', _RCNN)
    adapter = find_adapter(model, max_proposals=10)
    batch = adapter.prepare_batch(make_data())
    assert [p.shape for p in batch['proposals']] == [(10, 4), (10, 4)]
    with torch.no_grad():
        fp = adapter.forward(model, batch)
        for p in model.roi_head.bbox_head.parameters():   # "quantization noise"
            p.add_(0.01 * torch.randn_like(p))
        q = adapter.forward(model, batch)
    assert torch.equal(fp.rois, q.rois)                         # same RoIs, RoI by RoI
    assert fp.outputs[1][0].shape == q.outputs[1][0].shape == (20, 81)
    fp_roi, q_roi = adapter.decode_stages(fp)['roi'], adapter.decode_stages(q)['roi']
    assert fp_roi[0].boxes.shape == q_roi[0].boxes.shape == (10, 80, 4)
    assert float(adapter.global_loss()(fp, q)) > 0
    with pytest.raises(KeyError, match='proposals'):
        adapter.forward(model, {k: v for k, v in batch.items() if k != 'proposals'})


def test_an_image_without_proposals_gets_a_whole_image_box(monkeypatch):
    """A cascade RoI head (DetectoRS, HTC) cannot refine zero RoIs: an image for which the
    FP RPN finds nothing (random init) is calibrated on one whole-image proposal."""
    model = build_zoo_model('cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
                            {'backbone.depth': 18, 'neck.in_channels': [64, 128, 256, 512]})
    adapter = find_adapter(model, max_proposals=10)
    predict = model.rpn_head.predict

    def first_image_empty(*args, **kwargs):
        results = predict(*args, **kwargs)
        results[0] = results[0][:0]
        return results

    monkeypatch.setattr(model.rpn_head, 'predict', first_image_empty)
    batch = adapter.prepare_batch(make_data())
    h, w = SIZES[0]
    assert batch['proposals'][0].tolist() == [[0.0, 0.0, float(w), float(h)]]
    assert batch['proposals'][1].shape == (10, 4)
    with torch.no_grad():
        raw = adapter.forward(model, batch)                  # cascade refines 1 + 10 RoIs
    assert raw.rois.shape == (11, 5)


def test_crowddet_multi_instance_rois_decode_as_its_head_does():
    """CrowdDet's MultiInstanceBBoxHead predicts K = 2 (scores, box) per RoI: FGIC sees 2R
    predictions, decoded as the head's own _predict_by_feat_single lays them out."""
    model = build_zoo_model('crowddet/crowddet-rcnn_r50_fpn_8xb2-30e_crowdhuman.py',
                            {'backbone.depth': 18, 'neck.in_channels': [64, 128, 256, 512]})
    adapter = find_adapter(model, max_proposals=6)
    batch = adapter.prepare_batch(make_data())
    with torch.no_grad():
        raw = adapter.forward(model, batch)
    head = model.roi_head.bbox_head
    cls_score, bbox_pred = raw.outputs[1][:2]
    assert head.num_instance == 2 and cls_score.shape == (12, 2 * (head.num_classes + 1))
    roi = adapter.decode_stages(raw)['roi']
    assert roi[0].scores.shape == (12, head.num_classes + 1) and roi[0].boxes.shape == (12, 4)
    first = raw.rois[raw.rois[:, 0] == 0, 1:].repeat_interleave(2, dim=0)
    expected = head.bbox_coder.decode(first, bbox_pred[:6].reshape(-1, 4),
                                      max_shape=SIZES[0])
    assert torch.allclose(roi[0].boxes, expected)
    assert float(adapter.global_loss()(raw, raw)) == pytest.approx(0.0, abs=1e-6)


def test_global_loss_backpropagates_into_the_quantized_outputs():
    model = build_zoo_model('retinanet/retinanet_r50_fpn_1x_coco.py', {**_R18, **_HEAD})
    adapter = find_adapter(model)
    batch = adapter.prepare_batch(make_data())
    with torch.no_grad():
        fp = adapter.forward(model, batch)
    q = adapter.forward(model, batch)
    noisy = RawOutputs(tuple([m + 0.05 * torch.randn_like(m) for m in level]
                             for level in q.outputs), q.img_shapes)
    loss = adapter.global_loss(dict(theta_i=0.0))(fp, noisy)
    loss.backward()
    head = model.bbox_head
    assert loss > 0
    assert head.retina_reg.weight.grad.abs().sum() > 0
    assert head.retina_cls.weight.grad.abs().sum() > 0


def test_yolov3_prediction_convs_are_final_layers():
    """YOLOv3 names its per-level 1x1 prediction convs ``convs_pred``: they must be kept
    float by default like every other head's final layer."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from mmdet_regptq.models import final_layer_patterns
    register_all_modules()
    head = MODELS.build(dict(type='YOLOV3Head', num_classes=3, in_channels=[32, 16, 8],
                             out_channels=[32, 16, 8]))
    names = [f'bbox_head.{n}' for n, m in head.named_modules()
             if isinstance(m, torch.nn.Conv2d)]
    finals = _matching(final_layer_patterns(), names)
    assert finals == [f'bbox_head.convs_pred.{i}' for i in range(3)]


def test_yolov3_decodes_as_its_predict_by_feat():
    """Every detection of mmdet's own ``YOLOV3Head.predict_by_feat`` (after its
    objectness filter and NMS) is one of the decoded boxes, with its class score times
    objectness. (Our decoders clip boxes to the image, mmdet's YOLOv3 does not.)"""
    model = build_zoo_model('yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py', {})
    adapter = find_adapter(model)
    batch = adapter.prepare_batch(make_data())
    with torch.no_grad():
        raw = adapter.forward(model, batch)
        decoded = adapter.decode(raw)
        metas = [d.metainfo for d in batch['data_samples']]
        results = model.bbox_head.predict_by_feat(*[[m.clone() for m in maps] for maps in
                                                    raw.outputs], batch_img_metas=metas)
    for pred, result, (h, w) in zip(decoded, results, SIZES):
        assert len(result.bboxes) > 0
        clipped = result.bboxes.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, w)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, h)
        same_box = torch.cdist(clipped, pred.boxes,
                               compute_mode='donot_use_mm_for_euclid_dist') < 1e-3
        score = pred.scores[:, result.labels].T                 # [detections, priors]
        same_score = (result.scores[:, None] - score).abs() < 1e-5
        assert bool((same_box & same_score).any(dim=1).all())


def build_query_model(rel_path, stages=2, proposals=10):
    """Sparse R-CNN / QueryInst on ResNet-18 with ``stages`` DII stages and few proposals."""
    init_default_scope('mmdet')
    cfg = Config.fromfile(os.path.join(ZOO, rel_path))
    model_cfg = cfg.model
    model_cfg.backbone.depth = 18
    model_cfg.neck.in_channels = [64, 128, 256, 512]
    model_cfg.rpn_head.num_proposals = proposals
    roi = model_cfg.roi_head
    roi.num_stages, roi.stage_loss_weights = stages, roi.stage_loss_weights[:stages]
    for key in ('bbox_head', 'mask_head'):
        if key in roi:
            roi[key] = roi[key][:stages]
    model_cfg.train_cfg.rcnn = model_cfg.train_cfg.rcnn[:stages]
    model_cfg.test_cfg.rcnn.max_per_img = proposals
    _no_init_cfg(model_cfg)
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    model.init_weights()   # DII heads need their init (random boxes collapse otherwise)
    return model.eval()


@pytest.mark.parametrize('rel_path', ['sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py',
                                      'queryinst/queryinst_r50_fpn_1x_coco.py'])
def test_query_two_stage_decodes_as_predict_bbox(rel_path):
    """Sparse R-CNN / QueryInst (learned proposals, no RPN forward): every prediction of
    mmdet's own predict_bbox is one of the adapter's (query, class) scores with its box."""
    from mmdet_regptq.models import QueryTwoStageAdapter
    model = build_query_model(rel_path)
    adapter = find_adapter(model)
    assert type(adapter) is QueryTwoStageAdapter
    batch = adapter.prepare_batch(make_data())
    raw = adapter.forward(model, batch)
    preds = adapter.decode_stages(raw)['det']
    assert len(raw.outputs[0]) == 2                        # one (cls, boxes) per DII stage
    masks = raw.outputs[1]
    assert (masks is not None) == ('queryinst' in rel_path)
    if masks is not None:
        assert masks.shape[0] == 2 * 10
    with torch.no_grad():
        feats = model.extract_feat(batch['inputs'])
        proposals = model.rpn_head.predict(feats, batch['data_samples'])
        expected = model.roi_head.predict_bbox(
            feats, [s.metainfo for s in batch['data_samples']], proposals,
            model.roi_head.test_cfg, rescale=False)
    for pred, exp, (h, w) in zip(preds, expected, SIZES):
        assert pred.scores.shape == (10, model.roi_head.bbox_head[-1].num_classes)
        boxes = exp.bboxes.clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        for score, label, box in zip(exp.scores, exp.labels, boxes):
            rows = (pred.scores[:, label] - score).abs() < 1e-6
            assert rows.any() and torch.allclose(pred.boxes[rows][0], box, atol=1e-4)
    loss_fn = adapter.global_loss(FGICConfig())
    assert float(loss_fn(raw, raw).detach()) == pytest.approx(0.0, abs=1e-5)
    fp = RawOutputs(((tuple((c.detach(), b.detach()) for c, b in raw.outputs[0])), None),
                    raw.img_shapes)
    perturbed = adapter.forward(model, batch)
    loss = loss_fn(fp, RawOutputs(((raw.outputs[0][0],
                                    (perturbed.outputs[0][1][0] * 1.1,
                                     perturbed.outputs[0][1][1] + 1.0)), None),
                                  raw.img_shapes))
    loss.backward()
    assert float(loss) > 0
    reg = _matching(adapter.regression_layer_patterns(), _names(model))
    assert reg and all('reg' in n for n in reg)
    assert model.roi_head.bbox_head[-1].fc_reg.weight.grad is not None


def build_cascade_model(rel_path):
    """Cascade R-CNN / HTC / SCNet on ResNet-18 with 32-channel features and 64-wide box
    heads."""
    init_default_scope('mmdet')
    cfg = Config.fromfile(os.path.join(ZOO, rel_path))
    cfg.merge_from_dict({f'model.{k}': v for k, v in _R18.items()})
    model_cfg = cfg.model
    model_cfg.rpn_head.in_channels = model_cfg.rpn_head.feat_channels = 32
    roi = model_cfg.roi_head
    for key in ('bbox_roi_extractor', 'mask_roi_extractor', 'semantic_roi_extractor'):
        if key in roi:
            roi[key].out_channels = 32
    for head in roi.bbox_head:
        head.in_channels, head.fc_out_channels = 32, 64
    mask_heads = roi.get('mask_head', [])
    for head in [mask_heads] if isinstance(mask_heads, dict) else mask_heads:
        head.in_channels = head.conv_out_channels = 32
        head.num_convs = 1
    # SCNet's heads with ``conv_to_res`` build num_convs // 2 residual blocks (one kept
    # even for 0, then never called): 2 convs is their smallest working size
    convs = 2 if roi.get('semantic_head', {}).get('conv_to_res') else 1
    if 'semantic_head' in roi:
        roi.semantic_head.update(in_channels=32, conv_out_channels=32, num_convs=convs)
    if 'glbctx_head' in roi:                                         # SCNet
        roi.glbctx_head.update(in_channels=32, conv_out_channels=32, num_convs=convs)
    if 'feat_relay_head' in roi:
        roi.feat_relay_head.update(in_channels=64, out_conv_channels=32)
    model_cfg.test_cfg.rpn.max_per_img = 20
    model_cfg.test_cfg.rcnn.score_thr = 0.0     # random init: keep low-score detections
    _no_init_cfg(model_cfg)
    torch.manual_seed(0)
    return MODELS.build(model_cfg).eval()


@pytest.mark.parametrize('rel_path', ['cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
                                      'htc/htc_r50_fpn_1x_coco.py',
                                      'scnet/scnet_r50_fpn_1x_coco.py'])
def test_cascade_decodes_as_predict_bbox(rel_path):
    """Cascade R-CNN / HTC (semantic branch) / SCNet (semantic and global context
    features): every prediction of mmdet's own predict_bbox
    on the fixed FP proposals is one of the adapter's (RoI, class) scores with its box, and
    the global loss reaches every stage's regression layer (later stages pool the RoIs the
    earlier ones refined)."""
    from mmdet_regptq.models import CascadeAdapter
    model = build_cascade_model(rel_path)
    adapter = find_adapter(model)
    assert type(adapter) is CascadeAdapter and adapter.refines
    batch = adapter.prepare_batch(make_data())
    raw = adapter.forward(model, batch)
    preds = adapter.decode_stages(raw)['roi']
    counts = [len(p) for p in batch['proposals']]
    assert [len(p.scores) for p in preds] == counts
    with torch.no_grad():
        feats = model.extract_feat(batch['inputs'])
        extra = {}
        if getattr(model.roi_head, 'with_semantic', False):
            extra['semantic_feat'] = model.roi_head.semantic_head(feats)[1]
        if getattr(model.roi_head, 'with_glbctx', False):
            extra['glbctx_feat'] = model.roi_head.glbctx_head(feats)[1]
        from mmengine.structures import InstanceData
        expected = model.roi_head.predict_bbox(
            feats, [s.metainfo for s in batch['data_samples']],
            [InstanceData(bboxes=p) for p in batch['proposals']], model.roi_head.test_cfg,
            rescale=False, **extra)
    found = 0
    for pred, exp in zip(preds, expected):
        for score, label, box in zip(exp.scores, exp.labels, exp.bboxes):
            rows = (pred.scores[:, label] - score).abs() < 1e-6
            assert rows.any()
            boxes = pred.boxes[rows]
            boxes = boxes if boxes.dim() == 2 else boxes[:, label]   # class-agnostic or not
            assert any(torch.allclose(b, box, atol=1e-3) for b in boxes)
            found += 1
    assert found > 0
    loss_fn = adapter.global_loss(FGICConfig())
    assert float(loss_fn(raw, raw).detach()) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        fp = adapter.forward(model, batch)
    model.roi_head.bbox_head[0].fc_reg.weight.data.mul_(1.5)
    loss = loss_fn(fp, adapter.forward(model, batch))
    loss.backward()
    assert float(loss) > 0
    for head in model.roi_head.bbox_head:
        assert head.fc_reg.weight.grad is not None and head.fc_reg.weight.grad.abs().sum() > 0
    reg = _matching(adapter.regression_layer_patterns(), _names(model))
    assert {n for n in reg if n.startswith('roi_head.bbox_head.2')}


@pytest.mark.parametrize('rel_path', ['cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py',
                                      'htc/htc_r50_fpn_1x_coco.py',
                                      'scnet/scnet_r50_fpn_1x_coco.py'])
def test_cascade_forward_runs_every_mask_head_and_box_forward_none(rel_path):
    """The mask heads of Cascade Mask R-CNN / HTC / SCNet run in ``forward`` (so their
    layers are calibration units) and not in ``box_forward`` (Reg-PTQ's tails); both decode
    alike, and every box layer is called as often in one as in the other."""
    model = build_cascade_model(rel_path)
    adapter = find_adapter(model)
    batch = adapter.prepare_batch(make_data())
    heads = model.roi_head.mask_head
    heads = heads if isinstance(heads, torch.nn.ModuleList) else [heads]
    box_calls = []
    model.roi_head.bbox_head[-1].register_forward_hook(lambda *a: box_calls.append(1))
    calls = {i: 0 for i in range(len(heads))}
    for i, head in enumerate(heads):
        head.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    with torch.no_grad():
        full = adapter.forward(model, batch)
        assert all(n == 1 for n in calls.values()), calls
        assert len(box_calls) == 1
        boxes = adapter.box_forward(model, batch)
    assert all(n == 1 for n in calls.values()), calls
    assert len(box_calls) == 2
    for a, b in zip(adapter.decode(full), adapter.decode(boxes)):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.boxes, b.boxes)
    # every quantized layer, the mask heads' included, is a calibration unit
    from mmdet_regptq.calib import find_units
    from mmdet_regptq.quant import iter_quant_modules, quantize_model
    quantize_model(model, {'w_bits': 4, 'a_bits': 8},
                   example_forward=lambda m: adapter.forward(m, batch))
    in_units = {name for unit in find_units(model, adapter.forward, batch)
                for name, _ in unit.layers}
    quantized = {name for name, _ in iter_quant_modules(model)}
    assert {n for n in quantized if '.mask_head.' in n} and in_units == quantized


def test_mask_rcnn_box_forward_skips_the_mask_head_in_tail_runs():
    """Reg-PTQ's tail forwards of Mask R-CNN leave out the mask head (FGIC never reads it):
    ``box_forward`` decodes exactly as ``forward``; a TailRunner given it as ``tail_fn``
    runs a backbone unit's tail without calling the mask head and gives the same FGIC
    loss; a mask-head unit (not called by ``box_forward``) does not reach the loss, and
    would still run with the full forward."""
    from mmdet_regptq.calib import find_units
    from mmdet_regptq.calib.tail import TailRunner
    from mmdet_regptq.quant import init_activation_quantizers, quantize_model

    overrides, _, _ = ZOO_MODELS['mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']
    model = build_zoo_model('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', overrides)
    adapter = find_adapter(model, max_proposals=12)
    batch = adapter.prepare_batch(make_data())
    with torch.no_grad():
        full, boxes = adapter.forward(model, batch), adapter.box_forward(model, batch)
    assert len(full.outputs[1]) == 3 and len(boxes.outputs[1]) == 2
    for a, b in zip(adapter.decode(full), adapter.decode(boxes)):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.boxes, b.boxes)

    quantize_model(model, {'w_bits': 4, 'a_bits': 8},
                   example_forward=lambda m: adapter.forward(m, batch))
    init_activation_quantizers(model, lambda: adapter.forward(model, batch))
    units = find_units(model, adapter.forward, batch)
    mask_calls = []
    model.roi_head.mask_head.register_forward_hook(lambda *a: mask_calls.append(1))
    loss_fn = adapter.global_loss(FGICConfig())
    plain = TailRunner(model, adapter.forward, [batch])
    cheap = TailRunner(model, adapter.forward, [batch], tail_fn=adapter.box_forward)
    first = units[0]
    assert first.name.startswith('backbone')
    losses = []
    for runner in (plain, cheap):
        runner.prepare(first)
        mask_calls.clear()
        with torch.no_grad():
            result = runner.run(0)
            losses.append(float(loss_fn(runner.target(0), result.outputs)))
        assert len(result.unit_outputs) == first.num_calls
        assert bool(mask_calls) == (runner is plain)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    mask_unit = next(u for u in units if u.name.startswith('roi_head.mask_head'))
    assert cheap.reaches_loss(first) and plain.reaches_loss(mask_unit)
    assert not cheap.reaches_loss(mask_unit)   # calibrate() skips its tails (local only)
    cheap.prepare(mask_unit)
    assert cheap.forward_fn == adapter.forward
    with torch.no_grad():
        assert len(cheap.run(0).unit_outputs) == mask_unit.num_calls


def test_cascade_rpn_decodes_its_refined_anchors_as_its_predict():
    """Cascade RPN has no head forward: the adapter runs its stages as ``predict`` does and
    decodes the last stage from the refined anchors. Every proposal mmdet's own
    ``rpn_head.predict`` returns (after NMS) is one of the decoded boxes, with its score."""
    stage = {'in_channels': 32, 'feat_channels': 32}
    overrides = {**_R18, 'rpn_head.num_classes': 1,   # mmdet 3.3's config omits it
                 **{f'rpn_head.stages.{i}.{k}': v for i in (0, 1) for k, v in stage.items()},
                 'roi_head.bbox_roi_extractor.out_channels': 32,
                 'roi_head.bbox_head.in_channels': 32, 'roi_head.bbox_head.fc_out_channels': 64}
    model = build_zoo_model('cascade_rpn/cascade-rpn_faster-rcnn_r50-caffe_fpn_1x_coco.py',
                            overrides)
    adapter = find_adapter(model, max_proposals=50)
    assert isinstance(adapter, TwoStageAdapter)
    batch = adapter.prepare_batch(make_data())
    with torch.no_grad():
        raw = adapter.forward(model, batch)
        decoded = adapter.decode_stages(raw)['rpn']
        results = model.rpn_head.predict(model.extract_feat(batch['inputs']),
                                         batch['data_samples'], rescale=False)
    assert len(raw.outputs[0]) == 3                      # scores, deltas, refined anchors
    for pred, result in zip(decoded, results):
        assert len(result.bboxes) > 0
        same_box = torch.cdist(result.bboxes, pred.boxes,
                               compute_mode='donot_use_mm_for_euclid_dist') < 1e-3
        same_score = (result.scores[:, None] - pred.scores[None, :, 0]).abs() < 1e-5
        assert bool((same_box & same_score).any(dim=1).all())
    assert adapter.decode(raw)[0].boxes.shape[-1] == 4   # the RoI stage decodes as before


def test_grid_rcnn_decodes_scores_on_the_proposals_and_box_forward_skips_the_grid_head():
    """Grid R-CNN's box head has no regression (its grid head refines boxes after NMS by a
    heatmap argmax): the RoI stage decodes to the proposals with the box head's scores,
    and ``box_forward`` (Reg-PTQ's tails) leaves the grid head out, decoding the same."""
    overrides = {**_RCNN, 'roi_head.grid_roi_extractor.out_channels': 32,
                 'roi_head.grid_head.in_channels': 32, 'roi_head.grid_head.num_convs': 2,
                 'roi_head.grid_head.point_feat_channels': 4}
    model = build_zoo_model('grid_rcnn/grid-rcnn_r50_fpn_gn-head_1x_coco.py', overrides)
    adapter = find_adapter(model, max_proposals=12)
    batch = adapter.prepare_batch(make_data())
    calls = []
    model.roi_head.grid_head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = adapter.forward(model, batch)
        assert calls and len(full.outputs[1]) == 2          # (cls_score, grid_preds)
        calls.clear()
        cheap = adapter.box_forward(model, batch)
    assert not calls and len(cheap.outputs[1]) == 1
    for a, b, proposals in zip(adapter.decode(full), adapter.decode(cheap), batch['proposals']):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.boxes, b.boxes)
        assert torch.equal(a.boxes, proposals) and not a.sigmoid
