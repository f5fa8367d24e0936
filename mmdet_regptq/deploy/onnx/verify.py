"""Check a deployed model against the PyTorch fake-quant model, in output units and in LSBs.

Output differences alone are hard to judge for a quantized network: one activation code
that rounds the other way (``x / s`` vs ``x * (1 / s)`` at a tie) moves every output it
reaches by a step. :func:`compare_codes` therefore compares the integer codes of every
quantized activation tensor (the QuantizeLinear outputs of the export) with the codes the
fake-quant model produces for the same image; the deployment contract is that they agree
within 1 LSB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from mmdet_regptq.quant import iter_quant_modules

__all__ = ['CodeDiff', 'torch_codes', 'teacher_forced_codes', 'onnx_code_names', 'ort_run',
           'compare_codes', 'max_abs_diff']


@dataclass
class CodeDiff:
    """Agreement of one quantized tensor: ``max_lsb`` (max |code difference|) and
    ``mismatch`` (fraction of elements whose codes differ)."""

    name: str
    max_lsb: int
    mismatch: float


def _code_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(<layer>.<slot>, quantizer)`` of every enabled input quantizer with integer codes."""
    for name, layer in iter_quant_modules(model):
        if not layer.quant_input:
            continue
        for slot, quantizer in layer.input_quantizers().items():
            if quantizer is not None and quantizer.enabled and hasattr(quantizer, 'to_int'):
                yield f'{name}.{slot}', quantizer


@torch.no_grad()
def _run_with_code_hooks(model: nn.Module, args: Sequence[Tensor],
                         on_call: Callable[[str, nn.Module, Tensor, Tensor], Any]) -> None:
    """Run ``model(*args)`` once with ``on_call(prefix, quantizer, input, output)`` hooked
    on every code quantizer; ``prefix`` is keyed as in the export (``<layer>.<slot>.q`` for
    the first call, ``.q<k>`` for call ``k`` of a shared layer); what ``on_call`` returns
    replaces the quantizer's output (``None`` keeps it)."""
    calls: dict[str, int] = {}
    handles = []
    for key, quantizer in _code_quantizers(model):
        def hook(mod: nn.Module, inputs: tuple, output: Tensor, key: str = key) -> Any:
            k = calls[key] = calls.get(key, 0) + 1
            prefix = f'{key}.q' if k == 1 else f'{key}.q{k - 1}'
            return on_call(prefix, mod, inputs[0], output)
        handles.append(quantizer.register_forward_hook(hook))
    try:
        model.eval()
        model(*args)
    finally:
        for h in handles:
            h.remove()


def torch_codes(model: nn.Module, args: Sequence[Tensor]) -> dict[str, np.ndarray]:
    """Integer codes of every enabled input quantizer, keyed as in the export
    (``<layer>.<slot>.q`` for the first call, ``.q<k>`` for call ``k`` of a shared layer)."""
    codes: dict[str, np.ndarray] = {}

    def record(prefix: str, mod: nn.Module, x: Tensor, output: Tensor) -> None:
        codes[prefix] = mod.to_int(x).cpu().numpy()
    _run_with_code_hooks(model, args, record)
    return codes


def teacher_forced_codes(model: nn.Module, args: Sequence[Tensor],
                         deployed: Mapping[str, np.ndarray]) -> list[CodeDiff]:
    """Per-tensor LSB agreement without error propagation.

    The fake-quant model runs with every quantized activation *replaced by the deployed
    model's codes* (dequantized with the quantizer's own scale / zero point), so each
    quantizer sees the same input the deployed layer saw; its own codes are compared with
    the deployed ones. A difference is then local to that layer (float summation order,
    ``x / s`` vs ``x * (1 / s)`` at a rounding tie), not a flip inherited from upstream.

    Args:
        model: the fake-quant model (exported module, same names as the export).
        args: its inputs.
        deployed: prefix (``<layer>.<slot>.q[k]``) → codes, e.g. from ORT extra outputs.
    """
    diffs: list[CodeDiff] = []

    def force(prefix: str, mod: nn.Module, x: Tensor, output: Tensor) -> Tensor | None:
        if prefix not in deployed:
            return None
        own = mod.to_int(x)
        forced = torch.as_tensor(np.asarray(deployed[prefix]).astype(np.int64),
                                 device=own.device).reshape(own.shape)
        delta = (own.long() - forced).abs()
        diffs.append(CodeDiff(prefix, int(delta.max()), float((delta > 0).float().mean())))
        params = mod.quant_params()
        return ((forced.to(output.dtype) - params['zero_point'].to(output.dtype))
                * params['scale'].to(output.dtype))
    _run_with_code_hooks(model, args, force)
    return diffs


def onnx_code_names(model: onnx.ModelProto) -> dict[str, str]:
    """``prefix -> tensor`` holding the final integer code of each activation Q/DQ."""
    names: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == 'QuantizeLinear' and node.name.endswith('/QuantizeLinear'):
            prefix = node.name[:-len('/QuantizeLinear')]
            names.setdefault(prefix, node.output[0])
        if node.op_type == 'Clip' and node.name.endswith('/Clip'):
            names[node.name[:-len('/Clip')]] = node.output[0]
    return names


def ort_run(model: onnx.ModelProto | str, feed: Mapping[str, np.ndarray],
            extra_outputs: Sequence[str] = (), optimize: bool = True,
            threads: int = 0) -> dict[str, np.ndarray]:
    """Run ``model`` in ONNX Runtime (CPU) and return every output (plus ``extra_outputs``)."""
    import onnxruntime as ort

    model = onnx.load(model) if isinstance(model, str) else model
    if extra_outputs:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        known = {o.name for o in probe.graph.output}
        for name in extra_outputs:
            if name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
        model = probe
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=['CPUExecutionProvider'])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feed))))


def compare_codes(reference: Mapping[str, np.ndarray],
                  deployed: Mapping[str, np.ndarray]) -> list[CodeDiff]:
    """Per quantized tensor present in both: max code difference and mismatch fraction."""
    diffs = []
    for name, ref in reference.items():
        if name not in deployed:
            continue
        got = np.asarray(deployed[name]).astype(np.int64).reshape(ref.shape)
        delta = np.abs(got - ref.astype(np.int64))
        diffs.append(CodeDiff(name, int(delta.max(initial=0)), float((delta > 0).mean())))
    return diffs


def max_abs_diff(reference: Sequence[Tensor | np.ndarray],
                 deployed: Sequence[Tensor | np.ndarray]) -> float:
    """Max |a - b| over paired outputs."""
    worst = 0.0
    for a, b in zip(reference, deployed):
        a = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
        b = b.detach().cpu().numpy() if isinstance(b, Tensor) else np.asarray(b)
        worst = max(worst, float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()))
    return worst
