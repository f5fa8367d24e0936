"""Which config of each mmdet zoo folder the sweep runs, and how it is made to build on a
CPU without a network: pretrained weights off, SyncBN to BN, two mmdet 3.3 bugs worked
around, the RPN's proposals capped."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ['EXCLUDED', 'PREFERRED', 'zoo_root', 'pick_representative', 'representatives',
           'offline_cfg', 'mmdet_compat_cfg', 'mmdet_compat_model', 'cap_proposals']

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
