"""A quantized stride-2 stem on few input channels as a stride-1 conv on ``SpaceToDepth``
codes, for graphs that ONNX Runtime runs.

ORT's ``QLinearConv`` is slow on an image stem (3 input channels, 7x7 or 6x6, stride 2):
its im2col copies a 147-deep window per output pixel and the GEMM is 16 channels wide.
Rearranged, the same sums are a 4x4 stride-1 conv over 12 channels: pad the ``uint8``
image codes with their zero point (what ``QLinearConv`` pads with), ``SpaceToDepth(2)``,
and a kernel whose taps not in the original are the weight's zero point (contributing
``w - z_w = 0``). Same integer sums, same codes, and ORT runs it faster with and without
VNNI (``benchmarks/ort_stem.py``).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mmdet_regptq.deploy.onnx.graph import GraphIndex, attrs

__all__ = ['space_to_depth_stems', 'MAX_STEM_CHANNELS', 'stem_geometry']

#: input channels up to which a stride-2 conv is rewritten (an image stem)
MAX_STEM_CHANNELS = 4


def stem_geometry(size: int, kernel: int, pad_begin: int, pad_end: int) -> tuple | None:
    """One spatial axis of a stride-2 conv as a stride-1 conv on ``SpaceToDepth(2)``:
    ``(pad before, pad after, taps shifted by, new kernel)``, or None when the original
    leaves trailing input unread in a way padding cannot express.

    Output ``i`` reads ``x[2i + k - pad_begin]``; padding the input by an even ``a >=
    pad_begin`` shifts the taps by ``a - pad_begin``, so tap ``k`` lands on block ``i + j``,
    phase ``r`` with ``k + a - pad_begin = 2j + r``.
    """
    out = (size + pad_begin + pad_end - kernel) // 2 + 1
    before = pad_begin + pad_begin % 2
    shift = before - pad_begin
    new_kernel = -(-(kernel + shift) // 2)
    blocks = out + new_kernel - 1
    after = 2 * blocks - size - before
    if out < 1 or after < 0:
        return None
    return before, after, shift, new_kernel


def _rearranged_weight(codes: np.ndarray, zero: np.ndarray, shifts: tuple[int, int],
                       kernel: tuple[int, int]) -> np.ndarray:
    """``(O, C, KH, KW)`` codes → ``(O, 4C, kh, kw)`` in ``SpaceToDepth``'s channel order
    (``(row phase · 2 + column phase) · C + c``), new taps at the channel's zero point."""
    out_ch, in_ch, kh, kw = codes.shape
    wide = np.empty((out_ch, in_ch, 2 * kernel[0], 2 * kernel[1]), codes.dtype)
    wide[...] = np.broadcast_to(zero.reshape(-1, 1, 1, 1) if zero.ndim else zero, wide.shape)
    wide[:, :, shifts[0]:shifts[0] + kh, shifts[1]:shifts[1] + kw] = codes
    blocks = wide.reshape(out_ch, in_ch, kernel[0], 2, kernel[1], 2)
    return blocks.transpose(0, 3, 5, 1, 2, 4).reshape(out_ch, 4 * in_ch, *kernel)


def _spatial_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField('dim_value') for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def space_to_depth_stems(model: onnx.ModelProto) -> list[str]:
    """Rewrite each quantized ``DQ(codes) → Conv`` with stride 2, group 1, no dilation and
    at most :data:`MAX_STEM_CHANNELS` input channels, per-tensor input codes and constant
    weight codes, as ``Pad(zero point) → SpaceToDepth(2) → DQ → Conv(stride 1)`` (in
    place; module doc). The input's DequantizeLinear must carry its zero point (the
    padding value). Exact. Returns the rewritten Conv nodes' names."""
    index = GraphIndex(model)
    shapes = None
    added: dict[int, list[onnx.NodeProto]] = {}
    inits: list[onnx.TensorProto] = []
    orphans: set[str] = set()          # weight codes the rewritten stems no longer read
    replaced: set[int] = set()         # their DequantizeLinear nodes, dropped if unread
    done = []
    for conv in model.graph.node:
        if conv.op_type != 'Conv' or len(conv.input) < 2:
            continue
        a = attrs(conv)
        x_dq = index.producer_of(conv.input[0], 'DequantizeLinear')
        w_dq = index.producer_of(conv.input[1], 'DequantizeLinear')
        if (x_dq is None or w_dq is None or a.get('group', 1) != 1
                or list(a.get('strides', [1, 1])) != [2, 2]
                or any(d != 1 for d in a.get('dilations', [1, 1]))
                or a.get('auto_pad', b'NOTSET') not in (b'NOTSET', 'NOTSET')):
            continue
        x_scale = index.const(x_dq.input[1])
        codes = index.const(w_dq.input[0])
        if len(x_dq.input) < 3 or not x_dq.input[2] or x_scale is None or x_scale.size != 1 \
                or codes is None or codes.ndim != 4 \
                or codes.shape[1] > MAX_STEM_CHANNELS or attrs(w_dq).get('axis', 1) != 0:
            continue
        shapes = shapes if shapes is not None else _spatial_shapes(model)
        x_shape = shapes.get(conv.input[0])
        if x_shape is None or len(x_shape) != 4:
            continue
        pads = list(a.get('pads', [0, 0, 0, 0]))
        axes = [stem_geometry(x_shape[2 + i], codes.shape[2 + i], pads[i], pads[2 + i])
                for i in range(2)]
        if None in axes:
            continue
        w_zero_name = w_dq.input[2] if len(w_dq.input) > 2 else ''
        w_zero = index.const(w_zero_name) if w_zero_name else np.zeros((), codes.dtype)
        new_codes = _rearranged_weight(codes, w_zero, (axes[0][2], axes[1][2]),
                                       (axes[0][3], axes[1][3]))
        tag = f'{conv.name or conv.output[0]}/space_to_depth'
        x_zero = x_dq.input[2]
        orphans.add(w_dq.input[0])
        replaced.update((id(x_dq), id(w_dq)))
        inits += [numpy_helper.from_array(np.array([0, 0, axes[0][0], axes[1][0],
                                                    0, 0, axes[0][1], axes[1][1]], np.int64),
                                          f'{tag}.pads'),
                  numpy_helper.from_array(new_codes, f'{tag}.weight')]
        w_node = helper.make_node('DequantizeLinear', [f'{tag}.weight', *w_dq.input[1:]],
                                  [f'{tag}.weight.dq'], name=f'{tag}/weight', axis=0)
        added[id(conv)] = [
            helper.make_node('Pad', [x_dq.input[0], f'{tag}.pads', x_zero], [f'{tag}.padded'],
                             name=f'{tag}/Pad', mode='constant'),
            helper.make_node('SpaceToDepth', [f'{tag}.padded'], [f'{tag}.blocks'],
                             name=f'{tag}/SpaceToDepth', blocksize=2),
            helper.make_node('DequantizeLinear', [f'{tag}.blocks', *x_dq.input[1:]],
                             [f'{tag}.blocks.dq'], name=f'{tag}/DequantizeLinear'),
            w_node,
            helper.make_node('Conv', [f'{tag}.blocks.dq', f'{tag}.weight.dq', *conv.input[2:]],
                             list(conv.output), name=conv.name,
                             kernel_shape=[axes[0][3], axes[1][3]], strides=[1, 1],
                             pads=[0, 0, 0, 0])]
        done.append(conv.name or conv.output[0])
    if not done:
        return []
    nodes = []
    for node in model.graph.node:
        nodes.extend(added.get(id(node), [node]))
    used = {i for n in nodes for i in n.input} | {o.name for o in model.graph.output}
    nodes = [n for n in nodes if id(n) not in replaced or n.output[0] in used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name not in orphans or i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + inits)
    return done
