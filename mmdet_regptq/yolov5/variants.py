"""The YOLOv5 P5 model sizes and how to tell them apart from their weights."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from mmdet_regptq.yolov5.layers import make_divisible, scale_depth

__all__ = ['VARIANTS', 'config_name', 'variant_of', 'describe_state_dict', 'expected_shape']

#: size -> (depth_multiple, width_multiple) of the Ultralytics v6 yamls.
VARIANTS: dict[str, tuple[float, float]] = {
    'n': (0.33, 0.25), 's': (0.33, 0.50), 'm': (0.67, 0.75), 'l': (1.0, 1.0), 'x': (1.33, 1.25)}


def config_name(size: str | None) -> str:
    """Config of a model size (``configs/yolov5/yolov5_n_coco.py``)."""
    return f'configs/yolov5/yolov5_{size}_coco.py' if size else 'configs/yolov5/'


def expected_shape(depth: float, width: float) -> tuple[int, int, int]:
    """(stem channels, C3 blocks of stage 1, C3 blocks of stage 3) of a depth / width."""
    return make_divisible(64 * width), scale_depth(3, depth), scale_depth(9, depth)


def variant_of(depth: float, width: float) -> str | None:
    """The size whose multiples give the same layer shapes, or ``None``."""
    shape = expected_shape(depth, width)
    for size, (d, w) in VARIANTS.items():
        if expected_shape(d, w) == shape:
            return size
    return None


def describe_state_dict(state: Mapping[str, Tensor], prefix: str = '') -> dict | None:
    """Stem width, block counts, classes and size of an mmdet-named YOLOv5 state dict.

    Returns ``None`` when the keys are not those of :class:`YOLOv5Detector`.
    """
    stem = state.get(f'{prefix}backbone.stem.conv.weight')
    pred = state.get(f'{prefix}bbox_head.convs_pred.0.weight')
    anchors = 3
    if stem is None or pred is None:
        return None

    def blocks(stage: str) -> int:
        key = f'{prefix}backbone.{stage}.1.blocks.'
        return len({k[len(key):].split('.')[0] for k in state if k.startswith(key)})

    shape = (int(stem.shape[0]), blocks('stage1'), blocks('stage3'))
    size = next((s for s, (d, w) in VARIANTS.items() if expected_shape(d, w) == shape), None)
    return {'stem_channels': shape[0], 'stage1_blocks': shape[1], 'stage3_blocks': shape[2],
            'num_classes': int(pred.shape[0]) // anchors - 5, 'size': size}
