"""``YOLOv5CSPDarknet``: the YOLOv5 v6 backbone (6x6 stem, four Conv + C3 stages, SPPF)."""
from __future__ import annotations

from typing import Sequence

from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn

from mmdet_regptq.yolov5.layers import SPPF, conv_bn_silu, csp_layer, make_divisible, scale_depth

__all__ = ['YOLOv5CSPDarknet']

#: Per stage of the v6 yaml: (output channels at width 1, C3 blocks at depth 1).
_STAGES = ((128, 3), (256, 6), (512, 9), (1024, 3))


@MODELS.register_module()
class YOLOv5CSPDarknet(BaseModule):
    """YOLOv5 v6.x backbone (P5), layers 0-9 of the Ultralytics yaml.

    ``stem`` = layer 0 (Conv 6x6 / 2); ``stage{k}`` = ``Sequential(Conv 3x3 / 2, C3)``
    (layers 1-8), ``stage4`` also holds SPPF (layer 9).

    Args:
        deepen_factor: the yaml's ``depth_multiple`` (n/s 0.33, m 0.67, l 1.0, x 1.33).
        widen_factor: the yaml's ``width_multiple`` (n 0.25, s 0.5, m 0.75, l 1.0, x 1.25).
        out_indices: stages returned (2, 3, 4 = strides 8, 16, 32).
        init_cfg: mmengine init config.
    """

    def __init__(self, deepen_factor: float = 1.0, widen_factor: float = 1.0,
                 out_indices: Sequence[int] = (2, 3, 4), init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        if not set(out_indices) <= {0, 1, 2, 3, 4}:
            raise ValueError(f'out_indices={out_indices!r}: allowed values 0..4')
        self.out_indices = tuple(out_indices)
        stem_channels = make_divisible(64 * widen_factor)
        self.stem = conv_bn_silu(3, stem_channels, 6, stride=2, padding=2)
        in_channels = stem_channels
        for k, (channels, blocks) in enumerate(_STAGES, start=1):
            out_channels = make_divisible(channels * widen_factor)
            layers = [conv_bn_silu(in_channels, out_channels, 3, stride=2),
                      csp_layer(out_channels, out_channels, scale_depth(blocks, deepen_factor))]
            if k == len(_STAGES):
                layers.append(SPPF(out_channels, out_channels, 5))
            self.add_module(f'stage{k}', nn.Sequential(*layers))
            in_channels = out_channels

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        outs = []
        x = self.stem(x)
        for k in range(5):
            if k:
                x = getattr(self, f'stage{k}')(x)
            if k in self.out_indices:
                outs.append(x)
        return tuple(outs)
