"""An independent plain-torch forward of an Ultralytics YOLOv5 state dict.

Driven only by the Ultralytics keys and the routing in ``yolov5n_meta.json`` (layer types,
``from`` indices, yaml arguments); shares no code with ``mmdet_regptq.yolov5``. Returns the
raw outputs of the Detect convs (before the sigmoid), per level ``[B, A * (5 + C), H, W]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _conv(sd: dict, p: str, x: Tensor, stride: int = 1, pad: int | None = None) -> Tensor:
    w = sd[f'{p}.conv.weight']
    k = w.shape[-1]
    y = F.conv2d(x, w, None, stride, k // 2 if pad is None else pad)
    y = F.batch_norm(y, sd[f'{p}.bn.running_mean'], sd[f'{p}.bn.running_var'],
                     sd[f'{p}.bn.weight'], sd[f'{p}.bn.bias'], False, 0.0, 1e-3)
    return F.silu(y)


def _c3(sd: dict, p: str, x: Tensor, shortcut: bool) -> Tensor:
    n = len({k.split('.')[3] for k in sd if k.startswith(f'{p}.m.')})
    a = _conv(sd, f'{p}.cv1', x)
    for i in range(n):
        b = _conv(sd, f'{p}.m.{i}.cv2', _conv(sd, f'{p}.m.{i}.cv1', a))
        a = a + b if shortcut else b
    return _conv(sd, f'{p}.cv3', torch.cat((a, _conv(sd, f'{p}.cv2', x)), 1))


def _sppf(sd: dict, p: str, x: Tensor, k: int) -> Tensor:
    x = _conv(sd, f'{p}.cv1', x)
    y1 = F.max_pool2d(x, k, 1, k // 2)
    y2 = F.max_pool2d(y1, k, 1, k // 2)
    return _conv(sd, f'{p}.cv2', torch.cat((x, y1, y2, F.max_pool2d(y2, k, 1, k // 2)), 1))


@torch.no_grad()
def reference_forward(sd: dict, meta: dict, x: Tensor) -> list[Tensor]:
    sd = {k: v.float() for k, v in sd.items()}
    yaml = meta['yaml']
    specs = yaml['backbone'] + yaml['head']
    outs: list[Tensor] = []
    for layer, (_, _, kind, args) in zip(meta['layers'], specs):
        i, src = layer['i'], layer['f']
        inp = x if src == -1 else ([outs[-1] if s == -1 else outs[s] for s in src]
                                   if isinstance(src, list) else outs[src])
        p = f'model.{i}'
        if kind == 'Conv':
            y = _conv(sd, p, inp, args[2] if len(args) > 2 else 1,
                      args[3] if len(args) > 3 else None)
        elif kind == 'C3':
            y = _c3(sd, p, inp, args[1] if len(args) > 1 else True)
        elif kind == 'SPPF':
            y = _sppf(sd, p, inp, args[1])
        elif kind == 'nn.Upsample':
            y = F.interpolate(inp, scale_factor=args[1], mode=args[2])
        elif kind == 'Concat':
            y = torch.cat(inp, args[0])
        elif kind == 'Detect':
            return [F.conv2d(t, sd[f'{p}.m.{j}.weight'], sd[f'{p}.m.{j}.bias'])
                    for j, t in enumerate(inp)]
        else:
            raise ValueError(f'layer {i}: unknown type {kind}')
        outs.append(y)
        x = y
    raise ValueError('no Detect layer in the routing')
