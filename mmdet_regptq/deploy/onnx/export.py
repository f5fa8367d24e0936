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
from pathlib import Path
from typing import Any, Iterator, Sequence

import onnx
import torch
from torch import Tensor, nn

from mmdet_regptq.deploy.onnx.lower import (INT4_OPSET, QUANT_DOMAIN, ExportReport, check_onnx,
                                            lower_quant_ops)
from mmdet_regptq.quant import QuantModule, fake_quant_export, iter_quant_modules

__all__ = ['QUANT_DOMAIN', 'ExportReport', 'export_mode', 'legacy_onnx_export',
           'export_onnx', 'finalize_onnx', 'weight_codes']

logger = logging.getLogger(__name__)

#: Highest opset torch's TorchScript exporter knows. A higher requested opset is traced at
#: this one and the model's opset import is raised afterwards: opset 21 only extends
#: operator type lists (int4/uint4/...) over 20, no semantics change.
TORCHSCRIPT_MAX_OPSET = 20


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
