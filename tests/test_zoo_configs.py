"""configs/regptq: every config loads; for one bit width per detector the zoo model (random
init, no download) is quantized and calibrated through the config's own RegPTQHook on the
bundled synthetic images and predicts finite outputs.

The calibration runs are marked ``slow`` (deselect with ``-m "not slow"``) and kept cheap:
2 images at <= 96 px, 1 iteration per unit, min/max scale estimation instead of the
default Lp search (the bits and the hook come from the config). RetinaNet R50 runs every
time; ``REGPTQ_ZOO_ALL=1`` calibrates all ten detectors (about 15 minutes of CPU).
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmdet_regptq import zoo
from mmdet_regptq.bench.models import SYNTHETIC_ROOT as SYNTHETIC
from mmdet_regptq.zoo.report import seconds_cell
from mmdet_regptq.zoo.sweep import claim_folder, interrupted_row, seed_results, write_record

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs' / 'regptq'
BITS = ('w2a4', 'w3a3', 'w4a4', 'w4a8')
DETECTORS = {   # config stem (without bits) -> the bit width calibrated in the test
    'coco/retinanet_r50_fpn_{}_coco': 'w2a4',
    'coco/retinanet_r101_fpn_{}_coco': 'w3a3',
    'coco/yolof_r50-c5_{}_coco': 'w4a4',
    'coco/faster-rcnn_r50_fpn_{}_coco': 'w4a8',
    'coco/faster-rcnn_r101_fpn_{}_coco': 'w2a4',
    'coco/mask-rcnn_r50_fpn_{}_coco': 'w3a3',
    'coco/mask-rcnn_r101_fpn_{}_coco': 'w4a4',
    'coco/detr_r50_{}_coco': 'w4a8',
    'voc/retinanet_r50_fpn_{}_voc0712': 'w3a3',
    'voc/faster-rcnn_r50_fpn_{}_voc0712': 'w4a8',
}
ALL_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for folder in ('coco', 'voc')
                     for p in (CONFIGS / folder).glob('*.py'))


def test_every_detector_has_the_four_bit_widths():
    expected = sorted(f'{stem.format(bits)}.py' for stem in DETECTORS for bits in BITS)
    assert ALL_CONFIGS == expected


def test_readme_lists_every_config_and_checkpoint():
    readme = (CONFIGS / 'README.md').read_text()
    for name in ALL_CONFIGS:
        assert Path(name).name in readme, name
    assert len(re.findall(r'_\d{8}(?:_\d{6})?-[0-9a-f]{8}\.pth', readme)) >= len(DETECTORS)


@pytest.mark.parametrize('name', ALL_CONFIGS)
def test_config_loads(name):
    from mmengine.config import Config
    cfg = Config.fromfile(str(CONFIGS / name))
    assert cfg.custom_imports == dict(imports=['mmdet_regptq'], allow_failed_imports=False)
    (hook,) = cfg.custom_hooks
    w_bits, a_bits = map(int, re.search(r'_w(\d)a(\d)_', name).groups())
    assert hook['type'] == 'RegPTQHook'
    assert hook['quant'] == dict(w_bits=w_bits, a_bits=a_bits)
    assert hook['method'] == dict(type='RegPTQ')
    assert hook['calib'] == dict(num_images=256, batch_size=2)
    assert cfg.model.type and cfg.test_dataloader and cfg.train_dataloader
    assert cfg.load_from is None


def _synthetic_leaf(pipeline: list) -> dict:
    return dict(type='CocoDataset', data_root=str(SYNTHETIC) + '/',
                ann_file='annotations/instances_train.json', data_prefix=dict(img=''),
                metainfo=dict(classes=('circle', 'rectangle', 'triangle', 'ellipse', 'star',
                                       'cross')),
                filter_cfg=dict(filter_empty_gt=True), pipeline=pipeline)


def _swap_leaves(node: dict, pipeline: list) -> dict:
    """Replace every leaf dataset by the synthetic set, keeping the wrappers (VOC's
    RepeatDataset(ConcatDataset([...])) stays, so the hook's data path is exercised)."""
    if 'datasets' in node:
        node['datasets'] = [_swap_leaves(d, pipeline) for d in node['datasets']]
        return node
    if 'dataset' in node and 'ann_file' not in node:
        node['dataset'] = _swap_leaves(node['dataset'], pipeline)
        return node
    return _synthetic_leaf(pipeline)


def synthetic_cfg(name: str, max_size: int = 96):
    """The config with its data swapped for the synthetic set at <= ``max_size`` px."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(CONFIGS / name))
    pipeline = zoo.capped_test_pipeline(cfg, max_size=max_size)
    pipeline.insert(2, dict(type='LoadAnnotations', with_bbox=True))
    for loader in ('train_dataloader', 'test_dataloader', 'val_dataloader'):
        cfg[loader]['dataset'] = _swap_leaves(copy.deepcopy(cfg[loader]['dataset']), pipeline)
    return cfg


#: The configs name RegPTQ; calibrate here with QDrop (same units, AdaRound + LSQ + drop)
#: until quantize_detector passes Reg-PTQ its global loss (``calibrate(global_loss=...)``).
TEST_METHOD = 'QDrop'


def _method(cfg_method: dict) -> dict:
    assert cfg_method['type'] == 'RegPTQ'
    return dict(type=TEST_METHOD, iters=1, progress=False, log_interval=0)


#: Calibrated in every run (about 20 s of CPU); the other nine detectors take up to two
#: minutes of CPU each, over the suite's budget on 2 cores: REGPTQ_ZOO_ALL=1 selects them
#: too (tools/zoo_coverage.py runs the same check over the whole model zoo).
ALWAYS = 'coco/retinanet_r50_fpn_{}_coco'
CALIBRATED = sorted(DETECTORS.items()) if os.environ.get('REGPTQ_ZOO_ALL') == '1' else [
    (stem, bits) for stem, bits in sorted(DETECTORS.items()) if stem == ALWAYS]


@pytest.mark.slow
@pytest.mark.parametrize('stem,bits', CALIBRATED)
def test_calibrate_and_predict_on_synthetic(stem, bits, tmp_path, single_thread):
    from mmdet.registry import HOOKS, MODELS
    from mmdet.utils import register_all_modules
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import mmdet_regptq  # noqa: F401
    register_all_modules()
    name = f'{stem.format(bits)}.py'
    cfg = synthetic_cfg(name)
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(zoo.offline_cfg(copy.deepcopy(cfg.model)))
    model.init_weights()
    hook_cfg = copy.deepcopy(cfg.custom_hooks[0])
    hook_cfg['method'] = _method(hook_cfg['method'])
    hook_cfg['calib'].update(num_images=2, batch_size=2)
    hook_cfg['quant'].update(weight=dict(type='Uniform', per_channel=True, scale_method='minmax'),
                             act=dict(type='Uniform', scale_method='minmax'))
    hook_cfg['save'] = False
    hook = HOOKS.build(hook_cfg)
    runner = SimpleNamespace(model=model, cfg=cfg, work_dir=str(tmp_path),
                             logger=MMLogger.get_instance('test_zoo', log_level='WARNING'))
    hook.before_test(runner)                          # quantize + calibrate, as mim test does
    report = hook.result['report']
    assert report.num_quantized > 0.9 * report.num_eligible
    assert {r.w_bits for r in report.layers if r.kind != 'FP' and r.note != 'first'} == \
        {int(bits[1])}
    batch = zoo.synthetic_batch(cfg, num_images=1, max_size=96)
    model.eval()
    with torch.no_grad():
        out = model.test_step(batch)
    assert zoo.finite_outputs(out)
    assert len(out) == 1 and 'pred_instances' in out[0]


def test_offline_cfg_turns_downloads_off():
    cfg = dict(backbone=dict(type='mmpretrain.TIMMBackbone', pretrained=True,
                             init_cfg=dict(type='Pretrained', checkpoint='https://x/y.pth')),
               neck=dict(norm_cfg=dict(type='SyncBN')), teacher_ckpt='https://x/t.pth',
               teacher_config='configs/gfl/gfl_r101_fpn_ms-2x_coco.py')
    out = zoo.offline_cfg(cfg)
    assert out['backbone']['pretrained'] is False          # timm wants a bool, not None
    assert out['backbone']['init_cfg'] is None and out['teacher_ckpt'] is None
    assert out['neck']['norm_cfg']['type'] == 'BN'
    assert os.path.isfile(out['teacher_config'])            # LD's teacher: the packaged copy


def test_sweep_claims_a_folder_once_and_reclaims_a_dead_holder(tmp_path):
    """Two sweep processes on one --out (one --reverse) never run the same folder."""
    path = tmp_path / '.atss.running'
    assert claim_folder(path) == path and path.read_text() == str(os.getpid())
    assert claim_folder(path) is None                     # held by a live process (us)
    path.write_text('999999999')                         # a killed sweep's claim
    assert claim_folder(path) == path and path.read_text() == str(os.getpid())


def test_timeout_row_names_the_stage_and_the_units_done():
    row = zoo.finalize(zoo.timeout_row(dict(stage='quantize+calibrate', units_done=12,
                                              last_unit='backbone.layer2.0'), '900 s CPU'))
    assert row['error'] == ('timeout after 900 s CPU in quantize+calibrate after 12 units '
                            '(last: backbone.layer2.0)')
    assert row['failure'] == 'timeout (in quantize+calibrate)'
    assert zoo.timeout_row({}, '1800 s wall')['error'] == 'timeout after 1800 s wall in load'
    # the table names a row's CPU limit when it differs from the rendering run's --timeout
    assert seconds_cell(dict(seconds=1500.0, cpu_limit_s=2400), 900) == \
        '1500.0 (limit 2400 CPU-s)'
    assert seconds_cell(dict(seconds=90.0), 900) == '90.0'


def test_mmdet_compat_fixes_cascade_rpn_and_ssd_predict():
    """Two mmdet 3.3 bugs the sweep works around, each with a note: CascadeRPNHead without
    ``num_classes`` (config), SSDHead without ``loss_cls`` (predict)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from mmdet.registry import MODELS
    cfg = Config.fromfile(str(zoo.zoo_root() / 'cascade_rpn' / zoo.PREFERRED['cascade_rpn']))
    model_cfg = zoo.offline_cfg(cfg.model)
    assert zoo.mmdet_compat_cfg(model_cfg) == ['mmdet 3.3 bug: CascadeRPNHead num_classes=1 '
                                                'added']
    assert model_cfg.rpn_head.num_classes == 1 and zoo.mmdet_compat_cfg(model_cfg) == []
    init_default_scope('mmdet')
    ssd = MODELS.build(zoo.offline_cfg(Config.fromfile(
        str(zoo.zoo_root() / 'ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py')).model))
    assert not hasattr(ssd.bbox_head, 'loss_cls')
    assert zoo.mmdet_compat_model(ssd) == ['mmdet 3.3 bug: SSDHead.loss_cls=None (bbox_head)']
    assert ssd.bbox_head.loss_cls is None and zoo.mmdet_compat_model(ssd) == []


def test_a_stopped_sweeps_partial_row_is_rendered_as_interrupted(tmp_path):
    """A sweep killed mid-run leaves its child's partial row: --render-only shows it as
    interrupted (stage, units done) while no live sweep holds the folder and no newer
    result exists."""
    import json
    import time
    (tmp_path / 'dino.json').write_text(json.dumps(dict(fp_ok=False, stage='fp predict')))
    time.sleep(0.01)
    partial = tmp_path / '.dino.123.child.json'
    partial.write_text(json.dumps(dict(fp_ok=True, stage='quantize+calibrate', units_done=14,
                                       last_unit='backbone.layer3.0')))
    (tmp_path / '.dino.running').write_text('999999999')          # the killed sweep's claim
    row = interrupted_row(tmp_path, 'dino')
    assert row['error'] == ('sweep stopped in quantize+calibrate after 14 units '
                            '(last: backbone.layer3.0)')
    assert zoo.finalize(row)['failure'] == 'interrupted (sweep stopped)' and row['fp_ok']
    (tmp_path / '.dino.running').write_text(str(os.getpid()))     # a live sweep holds it
    assert interrupted_row(tmp_path, 'dino') is None
    (tmp_path / '.dino.running').unlink()
    time.sleep(0.01)
    (tmp_path / 'dino.json').write_text('{}')                     # a newer finished result
    assert interrupted_row(tmp_path, 'dino') is None
    assert interrupted_row(tmp_path, 'atss') is None


def test_the_committed_record_seeds_missing_rows_and_is_rewritten_from_all_results(tmp_path):
    """docs/results/zoo_coverage.jsonl makes a sweep resumable on a fresh checkout: rows missing
    from the results folder are seeded from it, stored rows win, and the record is
    rewritten (sorted, tracebacks cut) from every stored row."""
    import json
    results, record = tmp_path / 'results', tmp_path / 'record.jsonl'
    results.mkdir()
    record.write_text(json.dumps(dict(folder='yolo', fp_ok=True, predicted=True)) + '\n'
                      + json.dumps(dict(folder='atss', fp_ok=True, predicted=False)) + '\n')
    (results / 'atss.json').write_text(json.dumps(dict(folder='atss', fp_ok=True,
                                                       predicted=True, traceback='x' * 5000)))
    assert seed_results(record, results) == 1                 # only yolo was missing
    assert json.loads((results / 'yolo.json').read_text())['predicted'] is True
    assert json.loads((results / 'atss.json').read_text())['predicted'] is True
    (results / '.atss.77.child.json').write_text('{}')              # a child's partial row
    write_record(results, record)
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r['folder'] for r in rows] == ['atss', 'yolo']
    assert rows[0]['predicted'] is True and len(rows[0]['traceback']) == 1500
    assert not list(tmp_path.glob('.*.tmp'))                         # written atomically
    assert seed_results(tmp_path / 'missing.jsonl', results) == 0


def test_input_too_small_matches_the_kernel_size_errors():
    assert zoo.input_too_small(RuntimeError('input image is smaller than kernel'))
    assert zoo.input_too_small(RuntimeError(
        "Calculated padded input size per channel: (2 x 2). Kernel size: (3 x 3). Kernel size "
        "can't be greater than actual input size"))
    assert zoo.input_too_small(RuntimeError('selected index k out of range'))  # DINO topk
    assert not zoo.input_too_small(RuntimeError('carafe_forward_impl: not found'))


def test_cap_proposals_lowers_only_an_rpn_count_above_the_cap():
    from mmengine.config import ConfigDict

    cap_proposals = zoo.cap_proposals
    two_stage = ConfigDict(test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=1000),
                                         rcnn=dict(max_per_img=100)))
    assert cap_proposals(two_stage, 100) == 1000
    assert two_stage.test_cfg.rpn.max_per_img == 100
    assert two_stage.test_cfg.rcnn.max_per_img == 100          # detections untouched
    assert cap_proposals(two_stage, 100) is None               # already within the cap
    assert cap_proposals(two_stage, 0) is None                 # 0: the config's own count
    assert cap_proposals(ConfigDict(test_cfg=dict(score_thr=0.05)), 100) is None
    assert cap_proposals(ConfigDict(), 100) is None
