"""Model-zoo coverage: does "add three lines to any MMDet config" hold for mmdet's own zoo?

For one representative config of every 2D detection / instance segmentation folder of
mmdet's bundled zoo configs (``mmdet/.mim/configs``) this builds the detector with random
init (no pretrained weights, no downloads), predicts in FP on 2 synthetic images, then
quantizes it with the default policy (W4A4, first layer 8 bit, final layers FP), runs the
calibration (Reg-PTQ; QDrop while Reg-PTQ is not registered) with 2 iterations per unit on
those 2 images, and predicts again. Each config runs in its own process with a timeout.

    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python tools/zoo_coverage.py \
        --out work_dirs/zoo_coverage            # table: work_dirs/zoo_coverage/coverage.md
    .venv/bin/python tools/zoo_coverage.py --list          # representatives only
    .venv/bin/python tools/zoo_coverage.py --one retinanet/retinanet_r50_fpn_1x_coco.py

Choices (see ``pick_representative``): ``*_tta.py`` files are never picked; tracking,
re-id and video folders are out; SyncBN becomes BN (one process); the input size is the
config's test pipeline size, capped (``--max-size``) for CPU time, and so is the number
of RPN proposals per image (``--max-proposals``, ``test_cfg.rpn.max_per_img``: the RoI
head on 1000 proposals dominated the two-stage models' time); images are the bundled
synthetic set (``data/synthetic``) through the config's own test pipeline, annotation
loading steps removed. The optional packages some configs import are the ``zoo`` extra
(``pip install -e .[zoo]``: scikit-image, mmpretrain, timm).

The helpers (``offline_cfg``, ``capped_test_pipeline``, ``synthetic_batch``,
``count_quantized``) are also used by ``tests/test_zoo_configs.py``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / 'data' / 'synthetic'

#: Folders that are not 2D detection / instance segmentation, with the reason.
EXCLUDED = {
    '_base_': 'config fragments, not a detector',
    'common': 'shared schedules and datasets, not a detector',
    'bytetrack': 'multi-object tracking', 'deepsort': 'multi-object tracking',
    'ocsort': 'multi-object tracking', 'qdtrack': 'multi-object tracking',
    'sort': 'multi-object tracking', 'strongsort': 'multi-object tracking',
    'reid': 're-identification',
    'mask2former_vis': 'video instance segmentation',
    'masktrack_rcnn': 'video instance segmentation',
}

#: Folder -> representative where the name heuristic would pick a less typical config.
PREFERRED = {
    'mask2former': 'mask2former_r50_8xb2-lsj-50e_coco.py',     # instance, not panoptic
    'rtmdet': 'rtmdet_tiny_8xb32-300e_coco.py',                # detection, not -ins/-rotated
    'yolox': 'yolox_tiny_8xb8-300e_coco.py',
    'ssd': 'ssd300_coco.py',
    'pascal_voc': 'faster-rcnn_r50_fpn_1x_voc0712.py',
    'dcn': 'faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py',       # the folder's subject: DCN
    'dcnv2': 'faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py',
    'detectors': 'detectors_cascade-rcnn_r50_1x_coco.py',
    'lad': 'lad_r50-paa-r101_fpn_2xb8_coco_1x.py',             # R50 student
    'libra_rcnn': 'libra-faster-rcnn_r50_fpn_1x_coco.py',      # no precomputed proposals
    'guided_anchoring': 'ga-retinanet_r50_fpn_1x_coco.py',
    'pvt': 'retinanet_pvt-t_fpn_1x_coco.py',
    'regnet': 'retinanet_regnetx-800MF_fpn_1x_coco.py',
    'res2net': 'faster-rcnn_res2net-101_fpn_2x_coco.py',
    'v3det': 'faster_rcnn_r50_fpn_8x4_sample1e-3_mstrain_v3det_2x.py',
    'hrnet': 'faster-rcnn_hrnetv2p-w18-1x_coco.py',
    'cascade_rpn': 'cascade-rpn_faster-rcnn_r50-caffe_fpn_1x_coco.py',  # a detector, not RPN
}

_PENALTY = ('r101', 'x101', 'r152', 'x152', 'swin-l', 'swin-b', 'swinl', 'swinb', 'hourglass',
            'amp', 'lsj', 'ms-', '-ms', '3x', '2x', '20e', 'pretrain', 'syncbn', '90k', 'crop',
            'panoptic', 'tta', 'wandb', '-l_', '_l_', '-x_', '_x_', 'large', 'rotated')


# ------------------------------------------------------------------------ choosing configs
def zoo_root() -> Path:
    """``mmdet/.mim/configs`` of the installed mmdet."""
    import mmdet
    return Path(mmdet.__file__).parent / '.mim' / 'configs'


def _score(name: str) -> tuple:
    low = name.lower()
    return (0 if 'r50' in low or 'r-50' in low else 1,
            sum(tok in low for tok in _PENALTY),
            0 if '1x' in low else 1,
            len(name), name)


def pick_representative(folder: Path) -> Path | None:
    """The most typical detector config of a zoo folder (``None`` if it has none).

    ``PREFERRED`` first; else R50 over other backbones, fewest "heavier variant" tokens
    (R101/X101, AMP, LSJ, multi-scale, long schedules, ...), 1x, then the shortest name.
    ``*_tta.py`` files are test-time-augmentation fragments and never picked.
    """
    files = sorted(p for p in folder.glob('*.py') if not p.name.endswith('_tta.py'))
    if not files:
        return None
    preferred = PREFERRED.get(folder.name)
    if preferred and (folder / preferred).is_file():
        return folder / preferred
    return min(files, key=lambda p: _score(p.name))


def representatives(root: Path | None = None) -> list[tuple[str, Path | None, str]]:
    """``(folder, config or None, reason when skipped)`` for every zoo folder."""
    root = root or zoo_root()
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != '__pycache__'):
        if folder.name in EXCLUDED:
            out.append((folder.name, None, EXCLUDED[folder.name]))
            continue
        cfg = pick_representative(folder)
        out.append((folder.name, cfg, '' if cfg else 'no config file'))
    return out


# ------------------------------------------------------------------------ offline configs
def _is_remote(value: Any) -> bool:
    return isinstance(value, str) and (
        '://' in value or value.startswith(('open-mmlab', 'mmcls', 'torchvision', 'mmpretrain')))


def offline_cfg(node: Any) -> Any:
    """Make a model config build without network or process group (in place; returns it).

    ``init_cfg`` of type ``Pretrained`` (or pointing at a remote checkpoint) -> ``None``;
    ``pretrained`` / ``teacher_ckpt`` / ``checkpoint`` keys naming a file or URL -> ``None``
    (a boolean ``pretrained=True``, e.g. timm's download flag -> ``False``);
    ``SyncBN`` / ``MMSyncBN`` norm layers -> ``BN``; a ``teacher_config`` given relative to
    mmdet's repository (``configs/...``, knowledge distillation) -> the packaged copy.
    """
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            if key == 'init_cfg':
                items = value if isinstance(value, list) else [value]
                kept = [c for c in items if not (isinstance(c, dict) and (
                    c.get('type') == 'Pretrained' or _is_remote(c.get('checkpoint'))))]
                node[key] = (kept if isinstance(value, list) else (kept[0] if kept else None))
            elif key in ('pretrained', 'teacher_ckpt') or (
                    key == 'checkpoint' and _is_remote(value)):
                node[key] = False if isinstance(value, bool) else None  # timm: a bool flag
            elif key == 'type' and value in ('SyncBN', 'MMSyncBN', 'NaiveSyncBN'):
                node[key] = 'BN'
            elif key == 'teacher_config' and isinstance(value, str) and \
                    value.startswith('configs/'):
                node[key] = str(zoo_root() / value[len('configs/'):])
            else:
                offline_cfg(value)
    elif isinstance(node, (list, tuple)):
        for item in node:
            offline_cfg(item)
    return node


def mmdet_compat_cfg(model_cfg: Any) -> list[str]:
    """Work around mmdet 3.3 config bugs (in place); returns a note per change.

    ``CascadeRPNHead`` requires ``num_classes`` (it asserts 1) but the zoo's cascade RPN
    configs do not pass it.
    """
    notes = []
    rpn = model_cfg.get('rpn_head') if hasattr(model_cfg, 'get') else None
    if isinstance(rpn, dict) and rpn.get('type') == 'CascadeRPNHead' \
            and 'num_classes' not in rpn:
        rpn['num_classes'] = 1
        notes.append('mmdet 3.3 bug: CascadeRPNHead num_classes=1 added')
    return notes


def mmdet_compat_model(model: Any) -> list[str]:
    """Work around mmdet 3.3 model bugs (in place); returns a note per change.

    ``BaseDenseHead._predict_by_feat_single`` reads ``self.loss_cls``, which ``SSDHead``
    never sets (its loss is hand-written): predict raises AttributeError. ``None`` is
    what that line expects of a head without a custom-channel loss.
    """
    from mmdet.models.dense_heads.base_dense_head import BaseDenseHead

    notes = []
    for name, module in model.named_modules():
        # heads that decode through BaseDenseHead (a prior generator; not a wrapper of
        # stages like CascadeRPNHead)
        if isinstance(module, BaseDenseHead) and hasattr(module, 'prior_generator') \
                and not hasattr(module, 'loss_cls'):
            module.loss_cls = None
            notes.append(f'mmdet 3.3 bug: {type(module).__name__}.loss_cls=None ({name})')
    return notes


_ANNOTATION_LOADERS = ('LoadAnnotations', 'LoadPanopticAnnotations', 'LoadTrackAnnotations',
                       'FilterAnnotations', 'LoadSemSegAnnotations')
_NEVER = ('LoadProposals',)   # precomputed proposal files: there are none for these images


def _cap_size(size: Any, factor: float) -> Any:
    if isinstance(size, int):
        return max(32, int(round(size * factor)))
    if isinstance(size, (tuple, list)) and all(isinstance(s, (int, float)) for s in size):
        return tuple(max(32, int(round(s * factor))) for s in size)
    return size


def capped_test_pipeline(cfg: Any, max_size: int = 320, max_fixed: int = 640, *,
                         annotations: bool = False) -> list[dict]:
    """The config's test pipeline, its size capped.

    ``annotations=False`` drops the annotation loading steps; ``True`` keeps box/mask
    loading (panoptic loading becomes box + mask loading: the synthetic set has no
    panoptic maps), as the calibration images get it through the train set.

    A keep-ratio ``Resize`` (and a fixed ``Pad`` size) is scaled so that its longer side is
    at most ``max_size``; a fixed-shape resize (``keep_ratio=False``, ``FixShapeResize``)
    keeps the config's size up to ``max_fixed`` because anchors/priors may assume it.
    """
    if cfg.get('test_dataloader') is not None:
        pipeline = copy.deepcopy(cfg.test_dataloader['dataset'].get('pipeline'))
    else:
        pipeline = copy.deepcopy(cfg.get('test_pipeline'))
    if not pipeline:
        raise ValueError('the config has no test pipeline')
    pipeline = [dict(t) for t in pipeline]
    factor = 1.0
    out = []
    for t in pipeline:
        kind = str(t.get('type', '')).split('.')[-1]
        if kind in _NEVER or (kind in _ANNOTATION_LOADERS and not annotations):
            continue
        if kind in ('LoadPanopticAnnotations', 'LoadSemSegAnnotations', 'LoadTrackAnnotations'):
            t = dict(type='LoadAnnotations', with_bbox=True, with_mask=True)
        elif kind == 'LoadAnnotations':
            t['with_seg'] = False
        if kind == 'LoadImageFromFile':
            t['backend_args'] = None
        if kind in ('Resize', 'RandomResize') and t.get('scale') is not None:
            scale = t['scale']
            longest = max(scale) if isinstance(scale, (tuple, list)) else scale
            fixed = not t.get('keep_ratio', False)
            limit = max_fixed if fixed else max_size
            factor = min(1.0, limit / longest)
            t['scale'] = _cap_size(scale, factor)
        if kind == 'FixShapeResize':
            factor = min(1.0, max_fixed / max(t['width'], t['height']))
            t['width'], t['height'] = _cap_size((t['width'], t['height']), factor)
        if kind == 'Pad' and t.get('size') is not None:
            t['size'] = _cap_size(t['size'], factor if factor < 1 else
                                  min(1.0, max_size / max(t['size'])))
        out.append(t)
    return out


#: largest ``max_size`` tried when an input is too small for the network (doubling)
MAX_RETRY_SIZE = 1280


#: errors of an input too small for the network: a feature map smaller than a kernel
#: (mmcv's deformable conv, torch's conv), or fewer encoder tokens than the queries a
#: two-stage DETR selects with ``topk`` (DINO: 900 queries, 765 tokens at 192x192)
_TOO_SMALL = ('smaller than kernel', "Kernel size can't be greater than actual",
              'selected index k out of range')


def cap_proposals(model_cfg: Any, max_proposals: int) -> int | None:
    """Lower ``test_cfg.rpn.max_per_img`` to ``max_proposals`` (in place); returns the
    original value when it was lowered, else None (no RPN, or already within the cap)."""
    test_cfg = model_cfg.get('test_cfg') if hasattr(model_cfg, 'get') else None
    rpn = test_cfg.get('rpn') if hasattr(test_cfg, 'get') else None
    if not hasattr(rpn, 'get') or not max_proposals:
        return None
    current = rpn.get('max_per_img')
    if current is None or current <= max_proposals:
        return None
    rpn['max_per_img'] = max_proposals
    return current


def input_too_small(err: BaseException) -> bool:
    """Whether ``err`` says the input is too small for the network (see ``_TOO_SMALL``)."""
    return any(text in str(err) for text in _TOO_SMALL)


def synthetic_images(num: int = 2, split: str = 'val') -> list[Path]:
    """The first ``num`` images of the bundled synthetic set."""
    images = sorted((SYNTHETIC / split).glob('*.jpg'))[:num]
    if len(images) < num:
        raise FileNotFoundError(f'{SYNTHETIC / split} has {len(images)} images, need {num}; '
                                'run python -m mmdet_regptq.datasets.synthetic')
    return images


def synthetic_batch(cfg: Any, num_images: int = 2, max_size: int = 320) -> dict:
    """One collated batch (``inputs`` + ``data_samples``) of synthetic images through the
    config's capped test pipeline, with their boxes and masks, as the calibration loader
    (train images through the test pipeline) would yield it."""
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    from mmdet.datasets import CocoDataset
    from mmdet.registry import TRANSFORMS
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    steps = capped_test_pipeline(cfg, max_size, annotations=True)
    pipeline = Compose([TRANSFORMS.build(t) for t in steps])
    keys = ' '.join(str(t.get('meta_keys', '')) for t in steps)
    classes = ('circle', 'rectangle', 'triangle', 'ellipse', 'star', 'cross')
    dataset = CocoDataset(data_root=str(SYNTHETIC), ann_file='annotations/instances_val.json',
                          data_prefix=dict(img=''), metainfo=dict(classes=classes),
                          pipeline=[], test_mode=True)
    if len(dataset) < num_images:
        raise FileNotFoundError(f'{SYNTHETIC} has {len(dataset)} val images, need '
                                f'{num_images}; run python -m mmdet_regptq.datasets.synthetic')
    data = []
    for i in range(num_images):
        item = dataset.get_data_info(i)
        if 'text' in keys:                     # grounding detectors: class names as prompt
            item.update(text=classes, custom_entities=True)
        data.append(pipeline(item))
    return pseudo_collate(data)


# ------------------------------------------------------------------------ measuring
def conv_linear_ids(model: Any) -> set[int]:
    """ids of every Conv2d / Linear module of a float model."""
    from torch import nn
    return {id(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def count_quantized(model: Any, float_ids: set[int]) -> int:
    """How many of ``float_ids`` now have a weight quantizer (MHA: in/out projections)."""
    from torch import nn

    from mmdet_regptq.quant import iter_quant_modules
    done: set[int] = set()
    for _, wrapper in iter_quant_modules(model):
        if isinstance(wrapper.module, nn.MultiheadAttention):
            if getattr(wrapper, 'out_weight_quantizer', None) is not None:
                done.add(id(wrapper.module.out_proj))
        elif wrapper.weight_quantizer is not None:
            done.add(id(wrapper.module))
    return len(done & float_ids)


def finite_outputs(results: list) -> bool:
    """Whether every float tensor in the predicted data samples is finite."""
    import torch

    def walk(obj: Any) -> bool:
        if isinstance(obj, torch.Tensor):
            return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
        if hasattr(obj, 'all_items'):
            return all(walk(v) for _, v in obj.all_items())
        if isinstance(obj, (list, tuple)):
            return all(walk(v) for v in obj)
        if isinstance(obj, dict):
            return all(walk(v) for v in obj.values())
        return True
    return walk(results)


def recompute_bn_stats(model: Any, batch: dict) -> None:
    """Set every BatchNorm's running statistics from one train-mode pass of the backbone
    and neck over ``batch`` (cumulative average), then back to eval mode."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    try:
        with torch.no_grad():
            data = model.data_preprocessor(batch, False)
            model.train()
            model.extract_feat(data['inputs'])
    finally:
        model.eval()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def default_method() -> str:
    """'RegPTQ' when registered, else 'QDrop' (Reg-PTQ is being written in parallel)."""
    from mmdet_regptq.registry import PTQ_METHODS
    return 'RegPTQ' if PTQ_METHODS.get('RegPTQ') is not None else 'QDrop'


def classify_fp(err: str) -> str:
    """Reason class of a failure before quantization (the FP model)."""
    low = err.lower()
    if 'modulenotfounderror' in low or 'no module named' in low or (
            'importerror' in low and 'cannot import' in low) or 'please install' in low \
            or 'pip install' in low or 'is not installed' in low:
        return 'optional package missing'
    if 'required positional argument' in low or 'unexpected keyword argument' in low:
        return 'zoo config does not build in mmdet 3.3'
    if ('not implemented for' in low and 'cpu' in low) or 'only supports gpu' in low or \
            'implementation for device cpu not found' in low or \
            'cuda' in low or 'not compiled with gpu' in low:
        return 'mmcv op without CPU kernel'
    if 'http' in low or 'connection' in low or 'huggingface' in low or 'resolve' in low:
        return 'needs a download'
    if 'timeout' in low:
        return 'timeout'
    if 'no test pipeline' in low or 'model' in low and 'keyerror' in low:
        return 'config is not a single detector'
    return 'other'


def classify_quant(stage: str, err: str) -> str:
    """Reason class of a failure after the FP model worked."""
    low = err.lower()
    if stage == 'timeout':
        return 'timeout'
    if 'must match the size of tensor' in low or 'size mismatch' in low or (
            'shape' in low and 'mismatch' in low):
        return f'{stage}: data-dependent shapes differ between FP and quantized passes'
    if 'not finite' in low or 'nan' in low or 'inf' in low:
        return f'{stage}: non-finite values'
    if 'used before init_from' in low:
        return f'{stage}: quantizer never saw data (module bypassed by the forward)'
    if 'notimplementederror' in low:
        return f'{stage}: detector has no raw forward (_forward)'
    return f'{stage}: {err.split(":")[0].strip()[:60]}'


def _add_note(row: dict, note: str) -> None:
    row['note'] = f"{row['note']}; {note}" if row.get('note') else note


def run_one(config: str, *, max_size: int = 320, iters: int = 2, method: str | None = None,
            seed: int = 0, on_stage: Any = None, max_proposals: int = 100) -> dict:
    """Build, FP-predict, quantize, calibrate and predict one zoo config (this process).

    ``on_stage(row)`` is called after the FP prediction, after each calibrated unit and after
    the calibration, so that a parent that kills this process on timeout still knows how
    far it got (``units_done``, ``last_unit``).
    """
    on_stage = on_stage or (lambda row: None)
    import torch
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import mmdet_regptq  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmdet_regptq.engine.ptq import quantize_detector

    logger = MMLogger.get_instance('zoo_coverage', log_level='WARNING')
    MMLogger.get_instance('mmengine', log_level='WARNING')
    register_all_modules()
    path = Path(config) if Path(config).is_file() else zoo_root() / config
    row: dict[str, Any] = dict(config=str(path.relative_to(zoo_root())) if str(path).startswith(
        str(zoo_root())) else str(path), fp_ok=False, calibrated=False, predicted=False,
        stage='load', error='', n_conv_linear=0, n_quantized=0)
    method = method or default_method()
    row['method'] = method
    start = time.perf_counter()
    try:
        cfg = Config.fromfile(str(path))
        if cfg.get('model') is None:
            raise KeyError('the config has no model (not a detector config)')
        init_default_scope(cfg.get('default_scope', 'mmdet'))
        model_cfg = offline_cfg(copy.deepcopy(cfg.model))
        capped = cap_proposals(model_cfg, max_proposals)
        if capped:
            row['note'] = f'RPN proposals {capped} -> {max_proposals} per image'
        for note in mmdet_compat_cfg(model_cfg):
            _add_note(row, note)
        row['stage'] = 'build'
        torch.manual_seed(seed)
        model = MODELS.build(model_cfg)
        model.init_weights()
        model.eval()
        for note in mmdet_compat_model(model):
            _add_note(row, note)
        size = max_size
        while True:
            row['stage'] = 'data'
            batch = synthetic_batch(cfg, 2, size)
            row['input'] = 'x'.join(str(s) for s in batch['inputs'][0].shape[-2:])
            row['stage'] = 'fp predict'
            try:
                with torch.no_grad():
                    fp_out = model.test_step(batch)
                break
            except RuntimeError as err:
                # the capped input is too small for the network (``_TOO_SMALL``): double
                # it up to MAX_RETRY_SIZE (the cap never enlarges past the config's size)
                if not input_too_small(err) or size >= MAX_RETRY_SIZE:
                    raise
                size *= 2
                _add_note(row, f'input --max-size {size}: {max_size} is too small for it')
        if not finite_outputs(fp_out):
            # random init: without trained BN statistics some deep backbones blow up
            # (Darknet-53's boxes overflow); take the statistics from the 2 images
            recompute_bn_stats(model, batch)
            _add_note(row, 'BN statistics from the 2 images (random init: non-finite FP)')
            with torch.no_grad():
                fp_out = model.test_step(batch)
            if not finite_outputs(fp_out):
                raise FloatingPointError('FP predictions are not finite (random init)')
        row['fp_ok'] = True
        float_ids = conv_linear_ids(model)
        row['n_conv_linear'] = len(float_ids)
        row['stage'] = 'quantize+calibrate'
        on_stage(row)
        result = quantize_detector(
            model, [batch], quant=dict(w_bits=4, a_bits=4),
            method=dict(type=method, iters=iters, progress=False, log_interval=0),
            seed=seed, logger=logger, on_unit_end=lambda k, unit, stats: (
                row.update(units_done=k + 1, last_unit=unit.name), on_stage(row)))
        row['n_quantized'] = count_quantized(model, float_ids)
        row['n_units'] = len(result.get('stats', []))
        row['calibrated'] = True
        row['stage'] = 'predict'
        on_stage(row)
        with torch.no_grad():
            q_out = model.test_step(batch)
        if not finite_outputs(q_out):
            raise FloatingPointError('quantized predictions are not finite')
        row['predicted'] = True
        row['stage'] = 'done'
    except BaseException as err:  # noqa: BLE001 - every failure is a table row
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        lines = [ln for ln in f'{type(err).__name__}: {err}'.splitlines() if ln.strip()]
        row['error'] = ' '.join(lines[0].split())[:300] if lines else type(err).__name__
        row['traceback'] = traceback.format_exc()[-4000:]
        if row.get('n_conv_linear') and row['stage'] == 'quantize+calibrate':
            from mmdet_regptq.quant import iter_quant_modules
            row['n_quantized'] = count_quantized(model, float_ids) if any(
                True for _ in iter_quant_modules(model)) else 0
    row['seconds'] = round(time.perf_counter() - start, 1)
    return row


# ------------------------------------------------------------------------ the sweep
def _progress(row: dict) -> str:
    """A partial row's last stage, and in the calibration how many units it finished."""
    where = row.get('stage', 'load')
    if row.get('units_done') and where == 'quantize+calibrate':
        where += f" after {row['units_done']} units (last: {row['last_unit']})"
    return where


def timeout_row(row: dict, what: str) -> dict:
    """The row of a child killed after ``what`` (``'900 s CPU'``)."""
    return dict(row, timeout_in=row.get('stage', 'load'), stage='timeout',
                error=f'timeout after {what} in {_progress(row)}')


def interrupted_row(results: Path, folder: str) -> dict | None:
    """The row of a run whose sweep was stopped (its child's partial JSON is left, newer
    than the stored result, and no live sweep holds the folder), else None."""
    partials = sorted(results.glob(f'.{folder}.*.child.json'), key=lambda p: p.stat().st_mtime)
    done = results / f'{folder}.json'
    if not partials or (done.is_file() and done.stat().st_mtime >= partials[-1].stat().st_mtime):
        return None
    if _held_by_live_process(results / f'.{folder}.running'):
        return None                           # still running
    row = json.loads(partials[-1].read_text())
    return dict(row, folder=folder, stage='interrupted',
                error=f'sweep stopped in {_progress(row)}')


def _run_child(config: Path, out_json: Path, log: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), '--one', str(config),
           '--result', str(out_json), '--max-size', str(args.max_size),
           '--iters', str(args.iters), '--max-proposals', str(args.max_proposals)]
    if args.method:
        cmd += ['--method', args.method]
    def limit_cpu() -> None:   # CPU seconds, not wall time: the machine is shared
        resource.setrlimit(resource.RLIMIT_CPU, (args.timeout, args.timeout + 10))

    used_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, 'w') as log_f:
        proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True, preexec_fn=limit_cpu)
        try:
            proc.wait(timeout=args.wall_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the child's own process group
            proc.wait()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = round(used.ru_utime + used.ru_stime - used_before.ru_utime - used_before.ru_stime, 1)
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) or proc.returncode is None:
        row = json.loads(out_json.read_text()) if out_json.is_file() else {}
        what = (f'{args.timeout} s CPU' if proc.returncode == -signal.SIGXCPU
                else f'{args.wall_timeout} s wall')
        return dict(timeout_row(row, what), cpu_s=cpu_s)
    if out_json.is_file():
        return dict(json.loads(out_json.read_text()), cpu_s=cpu_s)
    tail = [ln for ln in log.read_text(errors='replace').splitlines() if ln.strip()][-1:]
    return dict(stage='crash', cpu_s=cpu_s, error=f'process exited with {proc.returncode}: '
                + (tail[0][:200] if tail else ''))


def finalize(row: dict) -> dict:
    """Add the failure class and the table cells to a result row."""
    if row.get('stage') == 'interrupted':
        row['failure'] = 'interrupted (sweep stopped)'
    elif row.get('stage') == 'timeout':
        row['failure'] = f"timeout (in {row.get('timeout_in', 'load')})"
    elif not row.get('fp_ok'):
        row['failure'] = classify_fp(
            row.get('error', '') + row.get('traceback', '')[-1500:])
    elif not row.get('predicted'):
        row['failure'] = classify_quant(row.get('stage', ''), row.get('error', ''))
    else:
        row['failure'] = ''
    return row


def _seconds(row: dict, default_limit: int) -> str:
    """Wall seconds, with the row's CPU limit when it ran under another ``--timeout``."""
    limit = row.get('cpu_limit_s', default_limit)
    return f"{row.get('seconds', '-')}" + (f' (limit {limit} CPU-s)' if limit != default_limit
                                           else '')


def _pct(row: dict) -> str:
    n = row.get('n_conv_linear') or 0
    if not n or not row.get('fp_ok'):
        return '-'
    q = row.get('n_quantized') or 0
    return f'{100 * q / n:.0f}% ({q}/{n})'


def _yes(flag: Any) -> str:
    return 'yes' if flag else 'no'


def render(rows: list[dict], skipped: list[tuple[str, str]], args: argparse.Namespace) -> str:
    """Markdown report: summary, main table, FP failures, quantization failures, skips."""
    fp_ok = [r for r in rows if r.get('fp_ok')]
    full = [r for r in fp_ok if r.get('predicted')]
    calibrated = [r for r in fp_ok if r.get('calibrated')]
    methods = sorted({r.get('method', '?') for r in calibrated if r.get('method')})
    pending = [f for f, cfg, _ in representatives() if cfg is not None] if args.render_only \
        else []
    missing = sorted(set(pending) - {r['folder'] for r in rows})
    lines = [
        '# MMDet zoo coverage', '',
        f'Command: `nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python tools/zoo_coverage.py '
        f'--max-size {args.max_size} --iters {args.iters} --timeout {args.timeout} '
        f'--max-proposals {args.max_proposals}'
        + (f' --method {args.method}' if args.method else '') + '`', '',
        f'- folders swept: {len(rows)} (+{len(skipped)} out of scope)'
        + (f'; not run yet: {len(missing)} ({", ".join(missing)})' if missing else ''),
        f'- FP builds and predicts: {len(fp_ok)} / {len(rows)}',
        f'- of those, quantized + calibrated: {len(calibrated)} / {len(fp_ok)}; '
        f'quantized + calibrated + predicts: **{len(full)} / {len(fp_ok)}'
        + (f' ({100 * len(full) / len(fp_ok):.1f}%)**' if fp_ok else '**'),
        f'- calibration method: {", ".join(methods)} ({args.iters} iterations per unit, '
        '2 synthetic images, W4A4 default policy)',
        '- two-stage rows whose note says "RPN proposals N -> M" ran with the proposal cap; '
        'rows swept before the cap existed ran with the config\'s own count', '',
        '| folder | config | input | FP builds+predicts | % Conv/Linear quantized | '
        'calibrated | predicted | s | error |',
        '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        err = (r.get('error') or '').replace('|', '\\|').replace('\n', ' ')[:140]
        if r.get('note'):
            err = f"{err} *({r['note']})*".strip()
        lines.append(f"| {r['folder']} | {Path(r.get('config', '')).name} | "
                     f"{r.get('input', '-')} | {_yes(r.get('fp_ok'))} | {_pct(r)} | "
                     f"{_yes(r.get('calibrated'))} | {_yes(r.get('predicted'))} | "
                     f"{_seconds(r, args.timeout)} | {err} |")
    fp_fail = [r for r in rows if not r.get('fp_ok')]
    lines += ['', f'## FP failures ({len(fp_fail)}): not counted in the quantization rate', '',
              '| folder | config | reason | error |', '|---|---|---|---|']
    for r in fp_fail:
        err = (r.get('error') or '').replace('|', '\\|')[:160]
        lines.append(f"| {r['folder']} | {Path(r.get('config', '')).name} | "
                     f"{r.get('failure')} | {err} |")
    q_fail = [r for r in fp_ok if not r.get('predicted')]
    lines += ['', f'## Quantization failures ({len(q_fail)})', '',
              '| folder | config | class | error |', '|---|---|---|---|']
    for r in q_fail:
        err = (r.get('error') or '').replace('|', '\\|')[:160]
        lines.append(f"| {r['folder']} | {Path(r.get('config', '')).name} | "
                     f"{r.get('failure')} | {err} |")
    classes: dict[str, int] = {}
    for r in q_fail:
        classes[r['failure']] = classes.get(r['failure'], 0) + 1
    if classes:
        lines += ['', 'By class: ' + '; '.join(f'{k}: {v}' for k, v in
                                               sorted(classes.items(), key=lambda kv: -kv[1]))]
    lines += ['', '## Out of scope', '', ', '.join(f'{f} ({why})' for f, why in skipped), '']
    return '\n'.join(lines)


def _held_by_live_process(path: Path) -> bool:
    """Whether the claim file ``path`` exists and names a live process."""
    try:
        os.kill(int(path.read_text() or 0), 0)
        return True
    except (ProcessLookupError, ValueError, FileNotFoundError):
        return False
    except PermissionError:       # alive, another user's
        return True


def _claim(path: Path) -> Path | None:
    """Create ``path`` holding this pid, or None while a live process holds it.

    Two sweep processes on one ``--out`` (one with ``--reverse``) meet in the middle; the
    claim keeps them from running the same folder twice.
    """
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _held_by_live_process(path):
                return None
            path.unlink(missing_ok=True)  # left by a killed sweep
            continue
        with os.fdopen(fd, 'w') as f:
            f.write(str(os.getpid()))
        return path
    return None


def seed_results(record: Path, results: Path) -> int:
    """Copy the committed record's rows into ``results`` where a folder has none yet.

    The record (``docs/zoo_coverage.jsonl``) is what makes a sweep resumable across
    machines: ``work_dirs`` is not committed, so a fresh checkout reruns only the folders
    asked for (``--only ... --rerun``) and renders the rest from earlier runs.
    """
    if not record.is_file():
        return 0
    seeded = 0
    for line in record.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        path = results / f"{row['folder']}.json"
        if not path.is_file():
            _write_atomic(path, json.dumps(row, indent=1))
            seeded += 1
    return seeded


def write_record(results: Path, record: Path) -> None:
    """Write every stored row (tracebacks cut to their last 1500 characters), one JSON line
    per folder, sorted, atomically."""
    rows = [json.loads(p.read_text()) for p in sorted(results.glob('*.json'))
            if not p.name.startswith('.')]
    lines = [json.dumps(dict(r, traceback=r.get('traceback', '')[-1500:]), sort_keys=True)
             for r in sorted(rows, key=lambda r: r['folder'])]
    _write_atomic(record, '\n'.join(lines) + '\n')


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    part.write_text(text)
    os.replace(part, path)


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out)
    (out / 'logs').mkdir(parents=True, exist_ok=True)
    (out / 'results').mkdir(parents=True, exist_ok=True)
    record = Path(args.record) if args.record else None
    if record is not None:
        seeded = seed_results(record, out / 'results')
        if seeded:
            print(f'{seeded} rows from {record} (rerun a folder with --only F --rerun)')
    reps = representatives()
    if args.only:
        wanted = set(args.only.split(','))
        reps = [r for r in reps if r[0] in wanted]
    skipped = [(f, why) for f, cfg, why in reps if cfg is None]
    rows = []
    started = time.time()
    for folder, cfg, _ in (reversed(reps) if args.reverse else reps):
        if cfg is None:
            continue
        res_path = out / 'results' / f'{folder}.json'
        interrupted = interrupted_row(out / 'results', folder) if args.render_only else None
        if interrupted is not None:
            row = interrupted
        elif args.render_only and not res_path.is_file():
            continue
        elif res_path.is_file() and (not args.rerun or res_path.stat().st_mtime > started):
            row = json.loads(res_path.read_text())     # --rerun: not what another sweep
                                                       # process finished since we started
        else:
            claim = _claim(out / 'results' / f'.{folder}.running')
            if claim is None:  # another sweep process is on this folder
                continue
            t0 = time.perf_counter()
            tmp = out / 'results' / f'.{folder}.{os.getpid()}.child.json'
            tmp.unlink(missing_ok=True)
            row = _run_child(cfg, tmp, out / 'logs' / f'{folder}.log', args)
            tmp.unlink(missing_ok=True)
            row.setdefault('config', str(cfg.relative_to(zoo_root())))
            row.setdefault('seconds', round(time.perf_counter() - t0, 1))
            row['folder'] = folder
            row['cpu_limit_s'] = args.timeout
            finalize(row)
            _write_atomic(res_path, json.dumps(row, indent=1))
            claim.unlink(missing_ok=True)
            if record is not None:
                write_record(out / 'results', record)
        row['folder'] = folder
        rows.append(finalize(row))
        print(f"{folder:22s} fp={_yes(row.get('fp_ok')):3s} quant={_pct(row):14s} "
              f"calib={_yes(row.get('calibrated')):3s} pred={_yes(row.get('predicted')):3s} "
              f"{row.get('seconds', '-')}s {row.get('error', '')[:90]}", flush=True)
        report = out / 'coverage.md'
        rows.sort(key=lambda r: r['folder'])
        tmp = report.with_suffix(f'.{os.getpid()}.tmp')
        tmp.write_text(render(rows, skipped, args))
        os.replace(tmp, report)
    print((out / 'coverage.md').read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=str(REPO / 'work_dirs' / 'zoo_coverage'))
    parser.add_argument('--max-size', type=int, default=320,
                        help='cap of the longer side of keep-ratio test resizes')
    parser.add_argument('--iters', type=int, default=2, help='calibration iterations per unit')
    parser.add_argument('--max-proposals', type=int, default=100,
                        help="cap of the RPN's test_cfg.rpn.max_per_img (0: the config's)")
    parser.add_argument('--timeout', type=int, default=900,
                        help='CPU seconds per config (RLIMIT_CPU of its process)')
    parser.add_argument('--wall-timeout', type=int, default=4 * 3600,
                        help='wall-clock seconds per config')
    parser.add_argument('--method', default=None,
                        help='PTQ method (default: RegPTQ if registered, else QDrop)')
    parser.add_argument('--record', default=str(REPO / 'docs' / 'zoo_coverage.jsonl'),
                        help='committed rows: seeds folders without a stored result and is '
                             'rewritten after each finished row ("" turns it off)')
    parser.add_argument('--only', default='', help='comma-separated folders')
    parser.add_argument('--rerun', action='store_true',
                        help='ignore results stored before this sweep started')
    parser.add_argument('--reverse', action='store_true',
                        help='last folder first (a second sweep process on the same --out '
                             'meets the first one in the middle; stored results are reused)')
    parser.add_argument('--list', action='store_true', help='print the representatives')
    parser.add_argument('--render-only', action='store_true',
                        help='write coverage.md from the stored results, run nothing')
    parser.add_argument('--one', default=None, help='run one config in this process')
    parser.add_argument('--result', default=None, help='with --one: write the row as JSON')
    args = parser.parse_args(argv)
    if args.list:
        for folder, cfg, why in representatives():
            print(f'{folder:22s} {cfg.name if cfg else "-":70s} {why}')
        return
    if args.one:
        def write(row: dict) -> None:
            if args.result:
                part = Path(f'{args.result}.part')
                part.write_text(json.dumps(row, indent=1))
                os.replace(part, args.result)
        row = run_one(args.one, max_size=args.max_size, iters=args.iters, method=args.method,
                      on_stage=write, max_proposals=args.max_proposals)
        text = json.dumps(row, indent=1)
        if args.result:
            Path(args.result).write_text(text)
        print(text)
        return
    sweep(args)


if __name__ == '__main__':
    main()
