"""Observation 2: the weight scale that minimises a layer's local output error is not the
one that gives the best detections.

One layer's weights are quantized (only that layer, activations FP) with a uniform grid
whose scale is the min-error initial scale times a factor; over a sweep of factors we
measure the layer's local output MSE (on its FP inputs from the bench's images), its
weight MSE, the detector's global measures against FP (:mod:`.metrics`) and, on a val
subset, its COCO AP, and mark the best factor of each.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from mmdet_regptq.analysis.bench import DetectorBench
from mmdet_regptq.analysis.branches import layer_parts, weighted_layers
from mmdet_regptq.analysis.metrics import ProxyConfig, compare_snapshots
from mmdet_regptq.analysis.report import Table, new_figure, save_figure
from mmdet_regptq.registry import QUANTIZERS, build_from

__all__ = ['ScalesConfig', 'ScalesResult', 'run_scales', 'swapped_weight', 'plot_scales',
           'default_factors']

logger = logging.getLogger(__name__)


def default_factors(num: int = 25, lo: float = 0.4, hi: float = 1.6) -> tuple[float, ...]:
    """Geometric sweep of scale factors around the initial scale (1.0 included)."""
    ratio = (hi / lo) ** (1 / (num - 1))
    factors = sorted({round(lo * ratio ** i, 4) for i in range(num)} | {1.0})
    return tuple(factors)


@dataclass(frozen=True)
class ScalesConfig:
    """The scale sweep of one layer.

    Args:
        layer: fully-qualified name of a Conv2d / Linear.
        bits: weight bits (2..8).
        factors: multipliers of the initial per-channel scale (> 0).
        quantizer: uniform quantizer config (``bits`` added); its ``scale`` is swept.
        with_ap: measure COCO AP at every factor.
        proxy: thresholds of the FP-vs-quantized measures.
    """
    layer: str
    bits: int = 4
    factors: tuple[float, ...] = field(default_factory=default_factors)
    quantizer: dict = field(default_factory=lambda: dict(
        type='Uniform', per_channel=True, symmetric=False, scale_method='mse'))
    with_ap: bool = False
    proxy: ProxyConfig = field(default_factory=ProxyConfig)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f'bits={self.bits} is out of range; allowed 2..8')
        if len(self.factors) < 2 or any(not f > 0 for f in self.factors):
            raise ValueError(f'factors={self.factors} needs >= 2 values, all > 0')


@dataclass
class ScalesResult:
    table: Table
    best: dict[str, float]
    files: list[Path] = field(default_factory=list)


@contextmanager
def swapped_weight(module: nn.Module, weight: Tensor) -> Iterator[None]:
    """Put ``weight`` into ``module.weight`` in place; restore the original on exit."""
    saved = module.weight.detach().clone()
    try:
        with torch.no_grad():
            module.weight.copy_(weight)
        yield
    finally:
        with torch.no_grad():
            module.weight.copy_(saved)


@torch.no_grad()
def _capture(bench: DetectorBench, module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(input, FP output) of every call of ``module`` over the bench's images."""
    pairs = []
    handle = module.register_forward_hook(
        # copies: an in-place activation (ConvModule's ReLU) would overwrite the output
        lambda m, args, out: pairs.append((args[0].detach().clone(), out.detach().clone())))
    try:
        for batch in bench.batches:
            bench.adapter.forward(bench.model, batch)
    finally:
        handle.remove()
    if not pairs:
        raise ValueError('the layer is never called by the forward pass')
    return pairs


def run_scales(bench: DetectorBench, cfg: ScalesConfig,
               out_dir: str | Path | None = None) -> ScalesResult:
    """Sweep the scale; ``scales.csv`` and ``scales.png`` in ``out_dir``."""
    modules = weighted_layers(bench.model)
    if cfg.layer not in modules:
        parts = layer_parts(bench.model, bench.adapter)
        head = parts['cls'] + parts['reg'] + parts['shared']
        raise ValueError(f'layer={cfg.layer!r} is not a Conv2d/Linear of '
                         f'{type(bench.model).__name__}; head layers: {head}')
    module = modules[cfg.layer]
    pairs = _capture(bench, module)
    ref = bench.snapshot(with_ap=cfg.with_ap)
    w = module.weight.detach().clone()
    q = build_from(QUANTIZERS, dict(cfg.quantizer), 'quantizer', bits=cfg.bits).to(w.device)
    q.init_from(w)
    if not isinstance(getattr(q, 'scale', None), torch.Tensor):
        raise ValueError(f'quantizer {cfg.quantizer} has no scale to sweep')
    base = q.scale.detach().clone()
    table = None
    for factor in cfg.factors:
        with torch.no_grad():
            q.scale.copy_(base * factor)
            wq = q(w)
        with swapped_weight(module, wq), torch.no_grad():
            local = sum(float(((module(x) - y) ** 2).mean()) for x, y in pairs) / len(pairs)
            cur = bench.snapshot(with_ap=cfg.with_ap)
        row = compare_snapshots(ref, cur, cfg.proxy, adapter=bench.adapter)
        if table is None:
            table = Table(['factor', 'local_mse', 'weight_mse'] + list(row),
                          title=f'{cfg.layer}: W{cfg.bits} scale sweep (factor x min-error '
                                f'scale, {bench.num_images} images)')
        table.add(factor=factor, local_mse=local, weight_mse=float(((wq - w) ** 2).mean()), **row)
    best = _best(table)
    result = ScalesResult(table, best)
    if out_dir is not None:
        out_dir = Path(out_dir)
        result.files.append(table.to_csv(out_dir / 'scales.csv'))
        result.files.append(plot_scales(table, best, out_dir / 'scales.png',
                                        title=f'{cfg.layer} (W{cfg.bits})',
                                        fp_map=ref.ap['mAP'] if ref.ap else None))
    return result


def _global_column(table: Table) -> str:
    return 'out_gl' if table.rows[0].get('out_gl') is not None else 'det_gl'


def _best(table: Table) -> dict[str, float]:
    """The best factor per measure (min of errors, max of AP); NaN rows ignored."""
    best = {}
    measures = ['local_mse', 'weight_mse', _global_column(table), 'out_box', 'det_box']
    for col in measures + ['mAP']:
        pts = [(r['factor'], r[col]) for r in table.rows
               if r.get(col) is not None and not math.isnan(r[col])]
        if pts:
            pick = max if col == 'mAP' else min
            best[col] = pick(pts, key=lambda p: p[1])[0]
    return best


def plot_scales(table: Table, best: dict[str, float], path: str | Path, *,
                title: str = '', fp_map: float | None = None) -> Path:
    """Local MSE (left axis) and the global measure (right axis) against the factor; AP in a
    second panel; vertical lines at each measure's best factor."""
    gcol = _global_column(table)
    has_ap = table.rows[0].get('mAP') is not None
    fig, axes = new_figure(2 if has_ap else 1, 1, size=(5.2, 3.9))
    ax = axes[0][0]
    xs = table.column('factor')
    ax.plot(xs, table.column('local_mse'), color='tab:blue', marker='o', markersize=3,
            label='local output MSE')
    ax.set_ylabel('local output MSE', color='tab:blue')
    ax.axvline(best['local_mse'], color='tab:blue', linestyle='--', linewidth=1)
    ax2 = ax.twinx()
    glabel = 'global loss L_G' if gcol == 'out_gl' else 'global-loss proxy'
    ax2.plot(xs, table.column(gcol), color='tab:red', marker='s', markersize=3, label=glabel)
    ax2.set_ylabel(glabel, color='tab:red')
    if gcol in best:
        ax2.axvline(best[gcol], color='tab:red', linestyle='--', linewidth=1)
    ax.axvline(1.0, color='0.5', linestyle=':', linewidth=1)
    ax.set_xlabel('scale / min-error scale')
    ax.set_title(f'best: local x{best["local_mse"]:g}, global x{best.get(gcol, math.nan):g}',
                 fontsize=9)
    lines = ax.get_lines()[:1] + ax2.get_lines()[:1]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc='upper center')
    ax.grid(True, alpha=0.3)
    if has_ap:
        ax = axes[0][1]
        ax.plot(xs, table.column('mAP'), color='tab:green', marker='o', markersize=3,
                label='mAP')
        ax.axvline(best['mAP'], color='tab:green', linestyle='--', linewidth=1)
        ax.axvline(best['local_mse'], color='tab:blue', linestyle='--', linewidth=1,
                   label='best local MSE')
        ax.axvline(1.0, color='0.5', linestyle=':', linewidth=1)
        if fp_map is not None:
            ax.axhline(fp_map, color='black', linestyle=':', linewidth=1, label='FP')
        ax.set_xlabel('scale / min-error scale')
        ax.set_ylabel('COCO mAP (val subset)')
        ax.set_title(f'best mAP at x{best["mAP"]:g}', fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
