"""YOLOv5 v6 building blocks that mmdet lacks, and the width / depth scaling rules.

``Conv`` (Conv-BN-SiLU) is mmcv's ``ConvModule`` and ``C3`` is mmdet's ``CSPLayer`` (the
same computation: ``cv3(cat(m(cv1(x)), cv2(x)))`` with ``Bottleneck(e=1.0)`` blocks); only
SPPF is written here.
"""
from __future__ import annotations

import math

import torch
from mmcv.cnn import ConvModule
from mmdet.models.layers import CSPLayer
from torch import Tensor, nn

__all__ = ['SPPF', 'conv_bn_silu', 'csp_layer', 'make_divisible', 'scale_depth',
           'NORM_CFG', 'ACT_CFG']

#: YOLOv5's BatchNorm2d(eps=1e-3, momentum=0.03) and SiLU.
NORM_CFG = dict(type='BN', momentum=0.03, eps=0.001)
ACT_CFG = dict(type='SiLU', inplace=True)


def make_divisible(channels: float, divisor: int = 8) -> int:
    """YOLOv5's channel rounding: up to a multiple of ``divisor``."""
    return int(math.ceil(channels / divisor) * divisor)


def scale_depth(num_blocks: int, deepen_factor: float) -> int:
    """YOLOv5's block count: ``max(round(n * depth_multiple), 1)`` for ``n > 1``."""
    return max(round(num_blocks * deepen_factor), 1) if num_blocks > 1 else num_blocks


def conv_bn_silu(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None) -> ConvModule:
    """YOLOv5 ``Conv``: bias-free conv (``autopad``: ``k // 2``), BN, SiLU."""
    return ConvModule(in_channels, out_channels, kernel_size, stride=stride,
                      padding=kernel_size // 2 if padding is None else padding,
                      norm_cfg=NORM_CFG, act_cfg=ACT_CFG)


def csp_layer(in_channels: int, out_channels: int, num_blocks: int,
              shortcut: bool = True) -> CSPLayer:
    """YOLOv5 ``C3`` as mmdet's ``CSPLayer`` (expand ratio 0.5, 1x1 + 3x3 bottlenecks)."""
    return CSPLayer(in_channels, out_channels, expand_ratio=0.5, num_blocks=num_blocks,
                    add_identity=shortcut, use_depthwise=False, norm_cfg=NORM_CFG,
                    act_cfg=ACT_CFG)


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained ``k x k`` max pools concatenated.

    Equal to SPP with kernels ``k, 2k - 1, 3k - 2`` at a third of the pooling cost.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: max-pool kernel (5 in YOLOv5 v6).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.conv1 = conv_bn_silu(in_channels, hidden, 1)
        self.conv2 = conv_bn_silu(hidden * 4, out_channels, 1)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.conv2(torch.cat((x, y1, y2, self.pool(y2)), dim=1))
