"""ONNX export of a quantized model: quantizers become QuantizeLinear/DequantizeLinear.

How it works (two steps, both exact):

1. :func:`export_mode` (a context manager) switches every quantizer of every
   ``QuantModule`` to its export form for the duration of a trace:

   - an *input* (activation) quantizer becomes one node ``mmdet_regptq::QuantAct`` whose
     eager value is ``fake_quant_export`` (bit for bit the quantizer's ``forward``);
   - a *weight* quantizer is evaluated once, before the trace, into integer codes
     ``q = round(w_q / s) + z`` (checked: ``s * (q - z)`` reproduces the fake-quantized
     weight), and the weight becomes ``mmdet_regptq::DequantizeWeight(codes)``.

   Only uniform affine quantizers (``quant_params()`` with ``scale`` / ``zero_point``)
   have this form. An LLAQ quantizer whose levels are powers of two
   (``LLAQuantizer.shift_form``) becomes ``mmdet_regptq::DequantizeShiftWeight(pos, neg)``.
   Any other weight quantizer (an LLAQ grid with a learned ``k``) is exported as the
   constant float tensor of its fake-quantized values, which keeps the values exact but
   not the compression, and is reported in :class:`ExportReport`.

2. :func:`lower_quant_ops` rewrites those custom nodes into standard ONNX:

   - ``QuantAct`` → ``QuantizeLinear`` → [``Clip`` on the integer tensor when the grid is
     narrower than its 8-bit carrier, e.g. a 4-bit ``0..15`` grid in ``uint8``] →
     ``DequantizeLinear``; per tensor (scalar scale / zero point);
   - ``DequantizeWeight`` → integer initializer + ``DequantizeLinear(axis=0)`` (per output
     channel), the weight Q/DQ already folded. With ``int4_weights`` and opset >= 21,
     grids of <= 4 bits are stored as ONNX ``INT4`` / ``UINT4`` initializers (two values
     per byte) with zero points of the same type; otherwise ``int8`` / ``uint8``.
   - ``DequantizeShiftWeight`` → ``(DQ(pos; s_+) + DQ(neg; s_-)) + mu``: two int8
     power-of-two initializers (zero point 0, axis 0) and the per-channel centre; the
     value is the fake-quantized LLAQ weight bit for bit.

The TorchScript exporter is used (``dynamo=False``): torch 2.14's default dynamo exporter
needs ``onnxscript``, which is not installed, and the TorchScript exporter's own symbolic of
``fake_quantize_*`` accepts only 8-bit ranges (it rejects a ``-8..7`` grid).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from mmdet_regptq.quant import QuantModule, fake_quant_export, iter_quant_modules

__all__ = ['QUANT_DOMAIN', 'ExportReport', 'export_mode', 'legacy_onnx_export',
           'export_onnx', 'lower_quant_ops', 'check_onnx', 'weight_codes']

logger = logging.getLogger(__name__)

#: Domain of the intermediate custom nodes (never left in a saved model).
QUANT_DOMAIN = 'mmdet_regptq'
#: First opset with INT4/UINT4 Q/DQ and 16-bit Q/DQ.
INT4_OPSET = 21
#: Highest opset torch's TorchScript exporter knows. A higher requested opset is traced at
#: this one and the model's opset import is raised afterwards: opset 21 only extends
#: operator type lists (int4/uint4/...) over 20, no semantics change.
TORCHSCRIPT_MAX_OPSET = 20


@dataclass
class ExportReport:
    """What the export did.

    Attributes:
        weights: ``name -> (bits, dtype)`` of every folded integer weight initializer.
        activations: ``name -> (qmin, qmax, carrier dtype)`` of every activation Q/DQ.
        float_weights: weight quantizers exported as float constants (non-uniform grids).
        opset: opset of the saved model.
    """

    weights: dict[str, tuple[int, str]] = field(default_factory=dict)
    activations: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    float_weights: list[str] = field(default_factory=list)
    opset: int = 0

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for _, dtype in self.weights.values():
            kinds[dtype] = kinds.get(dtype, 0) + 1
        return (f'{len(self.weights)} integer weights {kinds}, {len(self.activations)} '
                f'activation Q/DQ, {len(self.float_weights)} float-exported weight '
                f'quantizers, opset {self.opset}')


# ----------------------------------------------------------------------------- trace side
def _uniform_params(quantizer: nn.Module) -> tuple[Tensor, Tensor, int, int] | None:
    """``(scale, zero_point, qmin, qmax)`` of a uniform affine quantizer, else None."""
    try:
        params = quantizer.quant_params()
        qmin, qmax = quantizer.quant_range
    except (AttributeError, NotImplementedError):
        return None
    if set(params) != {'scale', 'zero_point'}:
        return None
    return params['scale'].float(), params['zero_point'].float(), int(qmin), int(qmax)


def _channel_axis(scale: Tensor) -> int | None:
    """Axis of a per-channel broadcast scale (``[C, 1, 1, 1]`` → 0), None per tensor."""
    if scale.numel() == 1:
        return None
    axes = [i for i, n in enumerate(scale.shape) if n > 1]
    if len(axes) != 1:
        raise ValueError(f'scale of shape {tuple(scale.shape)} is not per tensor or per channel')
    return axes[0]


@torch.no_grad()
def weight_codes(quantizer: nn.Module, weight: Tensor) -> tuple[Tensor, Tensor, Tensor, int,
                                                                   int, int | None] | None:
    """Integer codes of a fake-quantized weight.

    Args:
        quantizer: an initialised weight quantizer.
        weight: its float weight ``[C_out, ...]``.

    Returns:
        ``(codes int32 [weight shape], scale [C], zero_point int32 [C], qmin, qmax, axis)``
        (axis ``None`` per tensor), or ``None`` when the quantizer is not uniform affine.

    Raises:
        ValueError: the fake-quantized weight is not ``s * (q - z)`` on the grid (a uniform
            quantizer whose forward is not affine).
    """
    found = _uniform_params(quantizer)
    if found is None:
        return None
    scale, zp, qmin, qmax = found
    values = quantizer(weight.detach()).float()
    codes = torch.clamp(torch.round(values * (1.0 / scale)) + zp, qmin, qmax)
    back = (codes - zp) * scale
    tol = 1e-5 * scale.abs().expand_as(values)
    if not torch.all((back - values).abs() <= tol):
        raise ValueError(f'{getattr(quantizer, "name", "") or type(quantizer).__name__}: '
                         'fake-quantized weight is not on its affine grid')
    axis = _channel_axis(scale)
    flat_scale = scale.reshape(-1)
    flat_zp = zp.reshape(-1).round().to(torch.int32)
    return codes.to(torch.int32), flat_scale, flat_zp, qmin, qmax, axis


class _QuantActFn(torch.autograd.Function):
    """Activation fake quantization; exports as ``mmdet_regptq::QuantAct``.

    ``scale`` / ``zero_point`` tensors give the eager value; the same numbers as Python
    lists become the node's attributes (the tensors are dead in the traced graph).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, s_list: list[float],
                z_list: list[int], qmin: int, qmax: int, axis: int | None, name: str) -> Tensor:
        return fake_quant_export(x, scale, zero_point, qmin, qmax, axis)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, zero_point: Any, s_list: list[float],
                 z_list: list[int], qmin: int, qmax: int, axis: int | None, name: str) -> Any:
        out = g.op(f'{QUANT_DOMAIN}::QuantAct', x, scales_f=s_list, zero_points_i=z_list,
                   qmin_i=qmin, qmax_i=qmax, axis_i=-1 if axis is None else axis, name_s=name)
        out.setType(x.type())
        return out


class _DequantShiftWeightFn(torch.autograd.Function):
    """An LLAQ weight in shift form (``LLAQShiftForm``); exports as
    ``mmdet_regptq::DequantizeShiftWeight(pos, neg)``."""

    @staticmethod
    def forward(ctx: Any, pos: Tensor, neg: Tensor, values: Tensor, scale_pos: list[float],
                scale_neg: list[float], mu: list[float], bits: int, name: str) -> Tensor:
        return values

    @staticmethod
    def symbolic(g: Any, pos: Any, neg: Any, values: Any, scale_pos: list[float],
                 scale_neg: list[float], mu: list[float], bits: int, name: str) -> Any:
        out = g.op(f'{QUANT_DOMAIN}::DequantizeShiftWeight', pos, neg, scales_pos_f=scale_pos,
                   scales_neg_f=scale_neg, mu_f=mu, bits_i=bits, name_s=name)
        out.setType(values.type())
        return out


class _DequantWeightFn(torch.autograd.Function):
    """``s * (codes - z)`` of a folded weight; exports as ``mmdet_regptq::DequantizeWeight``."""

    @staticmethod
    def forward(ctx: Any, codes: Tensor, values: Tensor, scale: list[float], zero_point: list[int],
                qmin: int, qmax: int, axis: int | None, name: str) -> Tensor:
        return values

    @staticmethod
    def symbolic(g: Any, codes: Any, values: Any, scale: list[float], zero_point: list[int],
                 qmin: int, qmax: int, axis: int | None, name: str) -> Any:
        out = g.op(f'{QUANT_DOMAIN}::DequantizeWeight', codes, scales_f=scale,
                   zero_points_i=zero_point, qmin_i=qmin, qmax_i=qmax,
                   axis_i=-1 if axis is None else axis, name_s=name)
        out.setType(values.type())
        return out


def _act_forward(quantizer: nn.Module, name: str):
    found = _uniform_params(quantizer)
    if found is None:
        return None
    scale, zp, qmin, qmax = found
    s_list = [float(v) for v in scale.reshape(-1).tolist()]
    z_list = [int(round(v)) for v in zp.reshape(-1).tolist()]
    axis_cache: dict[int, int | None] = {}

    def forward(x: Tensor) -> Tensor:
        if not quantizer.enabled:
            return x
        if x.dim() not in axis_cache:
            axis_cache[x.dim()] = (quantizer._axis(x.dim()) if hasattr(quantizer, '_axis')
                                   else _channel_axis(scale))
        return _QuantActFn.apply(x, scale, zp, s_list, z_list, qmin, qmax, axis_cache[x.dim()],
                                 name)
    return forward


@contextlib.contextmanager
def export_mode(model: nn.Module, report: ExportReport | None = None) -> Iterator[ExportReport]:
    """Make every ``QuantModule`` of ``model`` trace to exportable quantization nodes.

    Inside the context each enabled, initialised quantizer's ``forward`` is replaced (an
    instance attribute, removed on exit): weight quantizers return their precomputed
    folded codes through ``DequantizeWeight``; input quantizers go through ``QuantAct``.
    Eager outputs inside the context equal the fake-quant model's outputs exactly.

    Args:
        model: a quantized (calibrated) model.
        report: filled with what was exported (a new one when None).

    Yields:
        The :class:`ExportReport` (its ``float_weights`` lists non-uniform quantizers).
    """
    report = report if report is not None else ExportReport()
    patched: list[nn.Module] = []
    try:
        for name, layer in iter_quant_modules(model):
            if layer.quant_weight:
                for slot, quantizer in layer.weight_quantizers().items():
                    if quantizer is None or not quantizer.enabled:
                        continue
                    _patch_weight(quantizer, layer, slot, f'{name}.{slot}', report, patched)
            if layer.quant_input:
                for slot, quantizer in layer.input_quantizers().items():
                    if quantizer is None or not quantizer.enabled:
                        continue
                    quantizer._check_initialized()
                    forward = _act_forward(quantizer, f'{name}.{slot}')
                    if forward is None:
                        logger.warning('%s.%s: %s is not uniform affine; its input quantizer '
                                       'is traced as float ops', name, slot,
                                       type(quantizer).__name__)
                        continue
                    quantizer.forward = forward
                    patched.append(quantizer)
        yield report
    finally:
        for quantizer in patched:
            quantizer.__dict__.pop('forward', None)


def _patch_weight(quantizer: nn.Module, layer: QuantModule, slot: str, name: str,
                  report: ExportReport, patched: list[nn.Module]) -> None:
    weight = layer.float_weight(slot)
    found = weight_codes(quantizer, weight)
    shift = (quantizer.shift_form(weight.detach()) if found is None
             and hasattr(quantizer, 'shift_form') else None)
    if shift is not None:
        values = shift.dequantize().to(weight.dtype)
        lists = [[float(v) for v in t.tolist()] for t in (shift.scale_pos, shift.scale_neg,
                                                          shift.mu)]
        bits = int(quantizer.bits)

        def forward_shift(w: Tensor) -> Tensor:
            return _DequantShiftWeightFn.apply(shift.pos, shift.neg, values, *lists, bits, name)

        quantizer.forward = forward_shift
        patched.append(quantizer)
        return
    if found is None:
        values = quantizer(weight.detach()).detach().clone()
        report.float_weights.append(name)
        quantizer.forward = lambda w, _v=values: _v
        patched.append(quantizer)
        return
    codes, scale, zp, qmin, qmax, axis = found
    values = ((codes.float() - zp.float().reshape(_bshape(codes, axis)))
              * scale.reshape(_bshape(codes, axis))).to(weight.dtype)
    carrier = torch.int16 if qmin < -128 or qmax > 255 else (
        torch.uint8 if qmin >= 0 else torch.int8)
    codes_t = codes.to(carrier)
    s_list = [float(v) for v in scale.tolist()]
    z_list = [int(v) for v in zp.tolist()]

    def forward(w: Tensor) -> Tensor:
        return _DequantWeightFn.apply(codes_t, values, s_list, z_list, qmin, qmax, axis, name)

    quantizer.forward = forward
    patched.append(quantizer)


def _bshape(codes: Tensor, axis: int | None) -> list[int]:
    if axis is None:
        return []
    shape = [1] * codes.dim()
    shape[axis] = codes.shape[axis]
    return shape


@contextlib.contextmanager
def legacy_onnx_export() -> Iterator[None]:
    """Route ``torch.onnx.export`` calls (e.g. mmdeploy's) to the TorchScript exporter.

    torch 2.14 defaults to ``dynamo=True`` (needs onnxscript, not installed here, and
    ignores mmdeploy's symbolic rewriters); this sets ``dynamo=False`` and registers the
    ``mmdet_regptq`` custom opset unless the caller passes them.
    """
    original = torch.onnx.export

    @functools.wraps(original)
    def export(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault('dynamo', False)
        opsets = dict(kwargs.get('custom_opsets') or {})
        opsets.setdefault(QUANT_DOMAIN, 1)
        kwargs['custom_opsets'] = opsets
        return original(*args, **kwargs)

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = original


# ----------------------------------------------------------------------------- lowering
_CARRIERS = (  # (lo, hi, ONNX type, numpy dtype name)
    (0, 255, TensorProto.UINT8, 'uint8'),
    (-128, 127, TensorProto.INT8, 'int8'),
    (0, 65535, TensorProto.UINT16, 'uint16'),
    (-32768, 32767, TensorProto.INT16, 'int16'),
)
_INT4_CARRIERS = ((0, 15, TensorProto.UINT4, 'uint4'), (-8, 7, TensorProto.INT4, 'int4'))


def _carrier(qmin: int, qmax: int, int4: bool) -> tuple[int, int, int, str]:
    for lo, hi, onnx_type, name in ((_INT4_CARRIERS if int4 else ()) + _CARRIERS):
        if lo <= qmin and qmax <= hi:
            return lo, hi, onnx_type, name
    raise ValueError(f'no ONNX integer type holds the grid {qmin}..{qmax}')


def _np_array(values: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name in ('int4', 'uint4'):
        import ml_dtypes
        return np.asarray(values).astype(np.int64).astype(getattr(ml_dtypes, dtype_name))
    return np.asarray(values).astype(dtype_name)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == 'Constant' and node.output[0] == name:
            return numpy_helper.to_array(_attrs(node)['value'])
    raise ValueError(f'{name!r} is not a constant (initializer or Constant node)')


def lower_quant_ops(model: onnx.ModelProto, *, int4_weights: bool = True,
                    report: ExportReport | None = None,
                    target_opset: int | None = None) -> onnx.ModelProto:
    """Rewrite the ``mmdet_regptq`` custom nodes into standard Q/DQ (see the module doc).

    Args:
        model: model exported under :func:`export_mode` (modified in place and returned).
        int4_weights: store grids of <= 4 bits as INT4/UINT4 initializers (needs opset >=
            21; otherwise int8/uint8 carriers are used and a warning is logged).
        report: filled with the lowered weights and activations.
        target_opset: raise the default-domain opset import to this (e.g. a model traced at
            20 by the TorchScript exporter, saved as 21 for INT4).

    Returns:
        The model, with the custom opset import removed.
    """
    report = report if report is not None else ExportReport()
    graph = model.graph
    for imp in model.opset_import:
        if imp.domain in ('', 'ai.onnx') and target_opset and imp.version < target_opset:
            imp.version = target_opset
            model.ir_version = max(model.ir_version, 10 if target_opset >= 21 else 8)
    opset = max((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')),
                default=0)
    if int4_weights and opset < INT4_OPSET:
        if any(n.domain == QUANT_DOMAIN and n.op_type == 'DequantizeWeight'
               and _attrs(n)['qmax'] - _attrs(n)['qmin'] < 16 for n in graph.node):
            logger.warning('int4_weights needs opset >= %d (got %d): int8 carriers are used',
                           INT4_OPSET, opset)
        int4_weights = False
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    consumed: set[str] = set()
    seen: dict[str, int] = {}
    for node in graph.node:
        if node.domain != QUANT_DOMAIN:
            new_nodes.append(node)
            continue
        attrs = _attrs(node)
        name = attrs['name'].decode() if isinstance(attrs['name'], bytes) else attrs['name']
        calls = seen[name] = seen.get(name, 0) + 1
        if node.op_type == 'DequantizeShiftWeight':
            consumed.update(node.input)
            nodes, inits = _lower_shift_weight(model, node, name, attrs, first=calls == 1)
            new_nodes += nodes
            new_inits += inits
            report.weights[name] = (int(attrs['bits']), 'int8 shift')
            continue
        qmin, qmax, axis = attrs['qmin'], attrs['qmax'], attrs['axis']
        scales = np.asarray(attrs['scales'], np.float32)
        zps = np.asarray(attrs['zero_points'], np.int64)
        per_tensor = axis < 0
        shape = [] if per_tensor else [len(scales)]
        if node.op_type == 'QuantAct':
            lo, hi, onnx_type, dtype = _carrier(qmin, qmax, False)
            # a shared module (one head conv on every FPN level) quantizes once per call
            prefix = f'{name}.q' if calls == 1 else f'{name}.q{calls - 1}'
            new_inits += [numpy_helper.from_array(scales.reshape(shape), f'{prefix}.scale'),
                          numpy_helper.from_array(_np_array(zps.reshape(shape), dtype),
                                                  f'{prefix}.zero_point')]
            q_out = f'{prefix}.int'
            q_attrs = {} if per_tensor else {'axis': axis}
            new_nodes.append(helper.make_node(
                'QuantizeLinear', [node.input[0], f'{prefix}.scale', f'{prefix}.zero_point'],
                [q_out], name=f'{prefix}/QuantizeLinear', **q_attrs))
            if (qmin, qmax) != (lo, hi):
                new_inits += [numpy_helper.from_array(_np_array(np.array(qmin), dtype),
                                                      f'{prefix}.qmin'),
                              numpy_helper.from_array(_np_array(np.array(qmax), dtype),
                                                      f'{prefix}.qmax')]
                new_nodes.append(helper.make_node(
                    'Clip', [q_out, f'{prefix}.qmin', f'{prefix}.qmax'], [f'{prefix}.clip'],
                    name=f'{prefix}/Clip'))
                q_out = f'{prefix}.clip'
            new_nodes.append(helper.make_node(
                'DequantizeLinear', [q_out, f'{prefix}.scale', f'{prefix}.zero_point'],
                [node.output[0]], name=f'{prefix}/DequantizeLinear', **q_attrs))
            report.activations[name] = (qmin, qmax, dtype)
        elif node.op_type == 'DequantizeWeight':
            consumed.add(node.input[0])
            _, _, onnx_type, dtype = _carrier(qmin, qmax, int4_weights)
            if calls == 1:  # a shared module's later calls reuse the same initializers
                codes = _constant_value(model, node.input[0]).astype(np.int64)
                new_inits += [numpy_helper.from_array(_np_array(codes, dtype), f'{name}.int'),
                              numpy_helper.from_array(scales.reshape(shape), f'{name}.scale'),
                              numpy_helper.from_array(_np_array(zps.reshape(shape), dtype),
                                                      f'{name}.zero_point')]
            dq_attrs = {} if per_tensor else {'axis': axis}
            new_nodes.append(helper.make_node(
                'DequantizeLinear', [f'{name}.int', f'{name}.scale', f'{name}.zero_point'],
                [node.output[0]], name=f'{name}/DequantizeLinear{calls - 1}', **dq_attrs))
            bits = int(np.ceil(np.log2(qmax - qmin + 1)))
            report.weights[name] = (bits, dtype)
        else:
            raise ValueError(f'unknown {QUANT_DOMAIN} node {node.op_type!r}')
    still_used = {i for n in new_nodes for i in n.input}
    kept_nodes = [n for n in new_nodes if not (n.op_type == 'Constant'
                                               and n.output[0] in consumed - still_used)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept_inits = [i for i in graph.initializer if i.name not in consumed - still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + new_inits)
    kept_inputs = [i for i in graph.input if i.name not in consumed - still_used]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    opsets = [o for o in model.opset_import if o.domain != QUANT_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    report.opset = opset
    return model


def _lower_shift_weight(model: onnx.ModelProto, node: onnx.NodeProto, name: str,
                        attrs: dict[str, Any], first: bool
                        ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``DequantizeShiftWeight`` → ``(DQ(pos; s_+) + DQ(neg; s_-)) + mu`` (axis 0, int8,
    zero point 0): standard ONNX whose value is the fake-quantized LLAQ weight exactly and
    which ``integer_graph`` turns into one int8 ``ConvInteger``."""
    inits = []
    if first:  # a shared module's later calls reuse the same initializers
        pos = _constant_value(model, node.input[0]).astype(np.int8)
        neg = _constant_value(model, node.input[1]).astype(np.int8)
        rows = pos.shape[0]
        zeros = np.zeros(rows, np.int8)
        mu = np.asarray(attrs['mu'], np.float32).reshape([rows] + [1] * (pos.ndim - 1))
        inits = [numpy_helper.from_array(pos, f'{name}.pos'),
                 numpy_helper.from_array(neg, f'{name}.neg'),
                 numpy_helper.from_array(np.asarray(attrs['scales_pos'], np.float32),
                                         f'{name}.scale_pos'),
                 numpy_helper.from_array(np.asarray(attrs['scales_neg'], np.float32),
                                         f'{name}.scale_neg'),
                 numpy_helper.from_array(zeros, f'{name}.zero_point'),
                 numpy_helper.from_array(mu, f'{name}.mu')]
    suffix = '' if first else f'_{node.output[0]}'
    nodes = [
        helper.make_node('DequantizeLinear', [f'{name}.pos', f'{name}.scale_pos',
                                              f'{name}.zero_point'], [f'{name}.pos_f{suffix}'],
                         name=f'{name}/DequantizePos{suffix}', axis=0),
        helper.make_node('DequantizeLinear', [f'{name}.neg', f'{name}.scale_neg',
                                              f'{name}.zero_point'], [f'{name}.neg_f{suffix}'],
                         name=f'{name}/DequantizeNeg{suffix}', axis=0),
        helper.make_node('Add', [f'{name}.pos_f{suffix}', f'{name}.neg_f{suffix}'],
                         [f'{name}.sides{suffix}'], name=f'{name}/AddSides{suffix}'),
        helper.make_node('Add', [f'{name}.sides{suffix}', f'{name}.mu'], [node.output[0]],
                         name=f'{name}/AddCentre{suffix}')]
    return nodes, inits


def check_onnx(model: onnx.ModelProto | str | Path) -> None:
    """``onnx.checker.check_model(full_check=True)`` (shape inference included).

    Raises:
        onnx.checker.ValidationError / onnx.shape_inference.InferenceError: invalid model.
    """
    onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model),
                             full_check=True)


# ----------------------------------------------------------------------------- entry point
def export_onnx(model: nn.Module, args: Tensor | Sequence[Tensor], path: str | Path, *,
                input_names: Sequence[str] = ('input',),
                output_names: Sequence[str] | None = None, opset: int = INT4_OPSET,
                int4_weights: bool = True, dynamic_axes: dict | None = None,
                ) -> ExportReport:
    """Export a quantized model to ONNX with standard Q/DQ and check it.

    Args:
        model: the quantized model (eval mode is set for the export and restored).
        args: example input(s).
        path: ``.onnx`` file to write.
        input_names: graph input names.
        output_names: graph output names (default ``output_0..``).
        opset: ONNX opset (>= 21 for INT4 weights).
        int4_weights: store <= 4-bit weights as INT4/UINT4.
        dynamic_axes: as ``torch.onnx.export``.

    Returns:
        The :class:`ExportReport`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = (args,) if isinstance(args, Tensor) else tuple(args)
    training = model.training
    model.eval()
    try:
        with export_mode(model) as report, legacy_onnx_export(), torch.no_grad():
            torch.onnx.export(model, args, str(path), input_names=list(input_names),
                              output_names=list(output_names) if output_names else None,
                              opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
    finally:
        model.train(training)
    finalize_onnx(path, int4_weights=int4_weights, report=report, target_opset=opset)
    return report


def finalize_onnx(path: str | Path, *, int4_weights: bool = True,
                  report: ExportReport | None = None,
                  target_opset: int | None = None) -> ExportReport:
    """Lower the custom nodes of an exported file in place, then check it."""
    report = report if report is not None else ExportReport()
    model = onnx.load(str(path))
    lower_quant_ops(model, int4_weights=int4_weights, report=report, target_opset=target_opset)
    check_onnx(model)
    onnx.save(model, str(path))
    logger.info('exported %s: %s', path, report.summary())
    return report
