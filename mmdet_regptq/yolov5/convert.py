"""Convert an Ultralytics YOLOv5 v6 P5 checkpoint into :class:`YOLOv5Detector` weights.

Input: an official release ``.pt`` (read by :mod:`mmdet_regptq.yolov5.unpickle`, no yolov5
code needed, nothing executed) or a plain ``state_dict`` with the Ultralytics keys
(``model.<i>....``). Output: ``{'state_dict': ..., 'meta': ...}`` in float32, written
atomically, loadable with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from mmdet_regptq.io import atomic_save
from mmdet_regptq.yolov5.unpickle import Stub, load_release_checkpoint, stub_state_dict
from mmdet_regptq.yolov5.variants import VARIANTS, config_name, expected_shape

__all__ = ['convert_yolov5', 'read_yolov5', 'rename_key', 'LAYER_NAMES', 'V6_LAYER_TYPES']

#: Ultralytics layer index -> module path in YOLOv5Detector (layers 11/12/15/16/19/22 are
#: Upsample / Concat, without weights).
LAYER_NAMES = {
    0: 'backbone.stem', 1: 'backbone.stage1.0', 2: 'backbone.stage1.1',
    3: 'backbone.stage2.0', 4: 'backbone.stage2.1', 5: 'backbone.stage3.0',
    6: 'backbone.stage3.1', 7: 'backbone.stage4.0', 8: 'backbone.stage4.1',
    9: 'backbone.stage4.2', 10: 'neck.reduce_p5', 13: 'neck.td_p4', 14: 'neck.reduce_p4',
    17: 'neck.out_p3', 18: 'neck.down_p3', 20: 'neck.out_p4', 21: 'neck.down_p4',
    23: 'neck.out_p5', 24: 'bbox_head'}

#: The v6 P5 architecture (yolov5{n,s,m,l,x}.yaml): layer types in order.
V6_LAYER_TYPES = ['Conv', 'Conv', 'C3', 'Conv', 'C3', 'Conv', 'C3', 'Conv', 'C3', 'SPPF',
                  'Conv', 'nn.Upsample', 'Concat', 'C3', 'Conv', 'nn.Upsample', 'Concat', 'C3',
                  'Conv', 'Concat', 'C3', 'Conv', 'Concat', 'C3', 'Detect']

_C3 = {'cv1': 'main_conv', 'cv2': 'short_conv', 'cv3': 'final_conv'}
_BOTTLENECK = {'cv1': 'conv1', 'cv2': 'conv2'}
_SPPF = {'cv1': 'conv1', 'cv2': 'conv2'}
STRIDES = (8, 16, 32)


def rename_key(key: str) -> str | None:
    """Ultralytics key -> YOLOv5Detector key (``None``: not a weight of the detector).

    ``model.2.m.0.cv1.conv.weight`` -> ``backbone.stage1.1.blocks.0.conv1.conv.weight``;
    ``model.24.m.1.bias`` -> ``bbox_head.convs_pred.1.bias``; ``model.24.anchors`` ->
    ``bbox_head.anchors`` (converted to pixels by the caller).
    """
    match = re.fullmatch(r'model\.(\d+)\.(.+)', key)
    if not match or int(match.group(1)) not in LAYER_NAMES:
        raise KeyError(f'unexpected YOLOv5 key {key!r} (expected model.<0..24>.<...>)')
    index, rest = int(match.group(1)), match.group(2)
    kind = V6_LAYER_TYPES[index]
    if kind == 'Detect':
        if rest == 'anchors':
            return 'bbox_head.anchors'
        sub = re.fullmatch(r'm\.(\d+)\.(weight|bias)', rest)
        if not sub:
            return None   # anchor_grid (older releases kept it as a buffer)
        return f'bbox_head.convs_pred.{sub.group(1)}.{sub.group(2)}'
    parts = rest.split('.')
    if kind == 'C3':
        if parts[0] == 'm':   # m.<k>.cv1.conv.weight -> blocks.<k>.conv1.conv.weight
            parts = ['blocks', parts[1], _BOTTLENECK[parts[2]], *parts[3:]]
        else:
            parts = [_C3[parts[0]], *parts[1:]]
    elif kind == 'SPPF':
        parts = [_SPPF[parts[0]], *parts[1:]]
    return f'{LAYER_NAMES[index]}.{".".join(parts)}'


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def read_yolov5(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Ultralytics state dict and what is known about the model (yaml, names, date).

    A plain state dict (``torch.load(weights_only=True)`` works) is tried first, then the
    restricted unpickler for a release ``.pt``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'YOLOv5 checkpoint not found: {path}')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        obj = load_release_checkpoint(path)
    info: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get('model', obj.get('ema')), Stub):
        model = obj['model'] if isinstance(obj.get('model'), Stub) else obj['ema']
        attrs = model.state
        info = {'yaml': attrs.get('yaml'), 'names': attrs.get('names'),
                'date': obj.get('date'), 'epoch': obj.get('epoch')}
        return stub_state_dict(model), info
    if isinstance(obj, Mapping):
        for key in ('state_dict', 'model'):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj), info
    raise ValueError(f'{path}: neither a YOLOv5 release checkpoint nor a state dict with '
                     "Ultralytics keys ('model.0.conv.weight', ...)")


def _architecture(state: Mapping[str, Tensor], yaml: Mapping | None
                  ) -> tuple[float, float, int, str | None]:
    """depth, width, classes and size of the Ultralytics weights (checked against v6 P5)."""
    if yaml is not None:
        types = [layer[2] for layer in list(yaml.get('backbone', [])) + list(yaml.get('head', []))]
        if types != V6_LAYER_TYPES:
            raise ValueError(f'unsupported YOLOv5 architecture (layers {types}); supported: '
                             'the v6.x P5 models yolov5{n,s,m,l,x}.yaml '
                             f'({V6_LAYER_TYPES})')
    if 'model.0.conv.weight' not in state or state['model.0.conv.weight'].shape[-1] != 6:
        raise ValueError('unsupported YOLOv5 checkpoint: layer 0 is not the v6 6x6 stem conv '
                         '(v5.0 Focus models and P6 models are not supported)')
    stem = int(state['model.0.conv.weight'].shape[0])
    blocks1 = len({k.split('.')[3] for k in state if k.startswith('model.2.m.')})
    blocks3 = len({k.split('.')[3] for k in state if k.startswith('model.6.m.')})
    size = next((s for s, (d, w) in VARIANTS.items()
                 if expected_shape(d, w) == (stem, blocks1, blocks3)), None)
    if yaml is not None:
        depth, width = float(yaml['depth_multiple']), float(yaml['width_multiple'])
    elif size is not None:
        depth, width = VARIANTS[size]
    else:
        raise ValueError(f'cannot tell the YOLOv5 size of this state dict (stem {stem} '
                         f'channels, C3 blocks {blocks1}/{blocks3}); known sizes: {VARIANTS}')
    pred = state['model.24.m.0.weight']
    anchors = state['model.24.anchors'].shape[1] if 'model.24.anchors' in state else 3
    return depth, width, int(pred.shape[0]) // anchors - 5, size


def _config_sizes(config: Any) -> tuple[float, float, int]:
    from mmengine.config import Config
    cfg = config if isinstance(config, Config) else Config.fromfile(str(config))
    model = cfg.model
    return (float(model.backbone.deepen_factor), float(model.backbone.widen_factor),
            int(model.bbox_head.num_classes))


def convert_yolov5(src: str | Path, dst: str | Path, config: Any = None) -> dict[str, Any]:
    """Convert ``src`` and write ``{'state_dict', 'meta'}`` to ``dst`` atomically.

    Args:
        src: release ``.pt`` or plain Ultralytics state dict.
        dst: output checkpoint (float32).
        config: optional mmdet config (path or ``Config``) that must match the weights.

    Returns:
        the written ``meta``.

    Raises:
        ValueError: unsupported architecture, or ``config`` of another size / class count
            (the message names the config that matches).
    """
    src = Path(src)
    state, info = read_yolov5(src)
    depth, width, num_classes, size = _architecture(state, info.get('yaml'))
    right = config_name(size) + (f' with num_classes={num_classes}' if num_classes != 80 else '')
    if config is not None:
        c_depth, c_width, c_classes = _config_sizes(config)
        if (expected_shape(c_depth, c_width) != expected_shape(depth, width)
                or c_classes != num_classes):
            raise ValueError(
                f'{config}: depth {c_depth} / width {c_width} / {c_classes} classes, but the '
                f'checkpoint is yolov5{size or "?"} (depth {depth}, width {width}, '
                f'{num_classes} classes); use {right}')
    out: dict[str, Tensor] = {}
    anchors = None
    for key, value in state.items():
        new = rename_key(key)
        if new is None:
            continue
        value = value.float() if value.is_floating_point() else value
        if new == 'bbox_head.anchors':   # grid units -> pixels
            value = value * torch.tensor(STRIDES, dtype=value.dtype).view(-1, 1, 1)
            anchors = value.tolist()
        out[new] = value.contiguous().clone()
    names = info.get('names')
    if isinstance(names, Mapping):
        names = [names[k] for k in sorted(names)]
    meta = {
        'yolov5': {'size': size, 'depth_multiple': depth, 'width_multiple': width,
                   'num_classes': num_classes, 'anchors': anchors, 'strides': list(STRIDES),
                   'config': config_name(size), 'source': src.name,
                   'source_sha256': _sha256(src), 'source_date': info.get('date')},
    }
    if names:
        meta['dataset_meta'] = {'classes': [str(n) for n in names]}
    atomic_save({'state_dict': out, 'meta': meta}, dst)
    return meta
