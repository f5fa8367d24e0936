"""Tiny quantized models for the deployment tests (CPU, seconds)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmdet_regptq.quant import init_activation_quantizers, quantize_model


class TinyNet(nn.Module):
    """Conv-ReLU (its output only feeds the next quantized conv), a grouped conv, a 1x1 conv
    without bias plus a residual, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(16, 8, 1, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))
        y = self.c3(y) + y[:, :8]
        return y, self.fc(y.mean((2, 3)))


class ResidualNet(nn.Module):
    """A ResNet basic block (add -> ReLU, the identity also read by the next convs) and an
    FPN top-down step (lateral + nearest 2x upsample), as in the bundled detectors."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.lateral = nn.Conv2d(8, 8, 1)
        self.top = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.c2(torch.relu(self.c1(x))) + x)
        top = self.top(torch.relu(self.down(y)))
        p = self.lateral(y) + F.interpolate(top, scale_factor=2.0, mode='nearest')
        return self.out(p)


class AddNet(nn.Module):
    """An add read by a quantized conv and by a conv the policy keeps FP."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.q = nn.Conv2d(16, 16, 3, padding=1)
        self.f = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.g = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.a(x) + self.b(x)
        return self.g(torch.relu(self.q(s))), self.g(torch.relu(self.f(s)))


def make_quantized(policy: dict, seed: int = 0, net: type[nn.Module] | None = None
                   ) -> tuple[nn.Module, torch.Tensor]:
    """A calibrated (MinMax) ``net`` (default TinyNet) and its calibration input
    ``[2, 3, 16, 16]``."""
    torch.manual_seed(seed)
    model = (net or TinyNet)().eval()
    x = torch.randn(2, 3, 16, 16)
    quantize_model(model, dict(final_layers=[], **policy), example_forward=lambda m: m(x))
    init_activation_quantizers(model, lambda: model(x))
    return model, x


