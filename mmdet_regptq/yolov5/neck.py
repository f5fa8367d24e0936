"""``YOLOv5PAFPN``: the YOLOv5 v6 PAN neck (layers 10-23 of the Ultralytics yaml)."""
from __future__ import annotations

import torch
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn

from mmdet_regptq.yolov5.layers import conv_bn_silu, csp_layer, make_divisible, scale_depth

__all__ = ['YOLOv5PAFPN']


@MODELS.register_module()
class YOLOv5PAFPN(BaseModule):
    """Top-down then bottom-up path over the backbone's P3, P4, P5.

    ============== ============================= ===============
    module         yaml layer                    output
    ============== ============================= ===============
    ``reduce_p5``  10 Conv 1x1                   lateral of P5
    ``td_p4``      13 C3 on cat(up(10), P4)      -
    ``reduce_p4``  14 Conv 1x1                   lateral of P4
    ``out_p3``     17 C3 on cat(up(14), P3)      stride 8
    ``down_p3``    18 Conv 3x3 / 2               -
    ``out_p4``     20 C3 on cat(18, 14)          stride 16
    ``down_p4``    21 Conv 3x3 / 2               -
    ``out_p5``     23 C3 on cat(21, 10)          stride 32
    ============== ============================= ===============

    Neck C3 layers have no shortcut. Upsampling is nearest, factor 2.

    Args:
        deepen_factor: the yaml's ``depth_multiple``.
        widen_factor: the yaml's ``width_multiple``.
        init_cfg: mmengine init config.
    """

    def __init__(self, deepen_factor: float = 1.0, widen_factor: float = 1.0,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        c3, c4, c5 = (make_divisible(c * widen_factor) for c in (256, 512, 1024))
        n = scale_depth(3, deepen_factor)
        self.reduce_p5 = conv_bn_silu(c5, c4, 1)
        self.td_p4 = csp_layer(2 * c4, c4, n, shortcut=False)
        self.reduce_p4 = conv_bn_silu(c4, c3, 1)
        self.out_p3 = csp_layer(2 * c3, c3, n, shortcut=False)
        self.down_p3 = conv_bn_silu(c3, c3, 3, stride=2)
        self.out_p4 = csp_layer(2 * c3, c4, n, shortcut=False)
        self.down_p4 = conv_bn_silu(c4, c4, 3, stride=2)
        self.out_p5 = csp_layer(2 * c4, c5, n, shortcut=False)
        self.upsample = nn.Upsample(scale_factor=2, mode='nearest')
        self.out_channels = (c3, c4, c5)

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        p3, p4, p5 = feats
        lat5 = self.reduce_p5(p5)
        lat4 = self.reduce_p4(self.td_p4(torch.cat((self.upsample(lat5), p4), 1)))
        out3 = self.out_p3(torch.cat((self.upsample(lat4), p3), 1))
        out4 = self.out_p4(torch.cat((self.down_p3(out3), lat4), 1))
        out5 = self.out_p5(torch.cat((self.down_p4(out4), lat5), 1))
        return out3, out4, out5
