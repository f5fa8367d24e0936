"""A tiny detector-like model for the calib tests: residual backbone, FPN-ish neck, and a
head whose convs are shared across the two feature levels."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mmdet_regptq.quant import quantize_model

NUM_CLASSES = 5


class Block(nn.Module):
    """ResNet BasicBlock without BN: relu(conv2(relu(conv1(x))) + x)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.layer1 = Block(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.layer2 = Block(16)

    def forward(self, x):
        f1 = self.layer1(F.relu(self.stem(x)))
        f2 = self.layer2(F.relu(self.down(f1)))
        return f1, f2


class Neck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lat1 = nn.Conv2d(8, 16, 1)
        self.lat2 = nn.Conv2d(16, 16, 1)

    def forward(self, feats):
        f1, f2 = feats
        p2 = self.lat2(f2)
        p1 = self.lat1(f1) + F.interpolate(p2, scale_factor=2.0, mode='nearest')
        return p1, p2


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.cls = nn.Conv2d(16, NUM_CLASSES, 3, padding=1)

    def forward(self, feats):
        return [self.cls(F.relu(self.conv(f))) for f in feats]


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.neck = Neck()
        self.head = Head()

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))


def forward_fn(model, batch):
    return model(batch)


def output_fn(outputs):
    """Raw per-level class maps ``[N, C, H, W]`` → logits ``[N * sum(HW), C]``."""
    return torch.cat([o.permute(0, 2, 3, 1).reshape(-1, o.shape[1]) for o in outputs])


def make_float(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def make_batches(num: int = 4, seed: int = 1, size: int = 16) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, size, size, generator=gen) for _ in range(num)]


def make_quant(float_model: Toy, w_bits: int = 4, a_bits: int = 4) -> Toy:
    model = copy.deepcopy(float_model)
    batch = make_batches(1)[0]
    quantize_model(model, dict(w_bits=w_bits, a_bits=a_bits),
                   example_forward=lambda m: m(batch))
    return model


def output_mse(model, float_model, batches) -> float:
    with torch.no_grad():
        errs = [sum(F.mse_loss(q, f).item() for q, f in zip(model(b), float_model(b)))
                for b in batches]
    return sum(errs) / len(errs)
