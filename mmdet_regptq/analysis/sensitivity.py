"""Which layers hurt most when quantized: one layer at a time, the rest FP.

The detector is converted once with the policy the hook would build (``--bits`` as
``w_bits``; the first layer at 8 bit and the final prediction layers FP unless told
otherwise); then every quantized layer is switched on alone, its damage measured against
the FP model (AP drop on a val subset, else the global-loss proxy of :mod:`.metrics`),
the layers sorted, and the worst ones suggested as per-layer overrides in the syntax of
``RegPTQHook(quant=dict(overrides=...))``.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.patches import Patch

from mmdet_regptq.analysis.bench import DetectorBench
from mmdet_regptq.analysis.branches import PARTS, layer_parts
from mmdet_regptq.analysis.metrics import ProxyConfig, compare_snapshots
from mmdet_regptq.analysis.report import Table, new_figure, save_figure
from mmdet_regptq.engine.ptq import build_policy
from mmdet_regptq.quant import (QuantPolicy, init_activation_quantizers, iter_quant_modules,
                                quantize_model, set_quant_state)

__all__ = ['SensitivityConfig', 'SensitivityResult', 'run_sensitivity', 'format_overrides',
           'plot_sensitivity']

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivityConfig:
    """The per-layer sweep.

    Args:
        bits: weight bits of the layer under test (2..8).
        a_bits: also quantize that layer's input at these bits (2..16); None = weights only.
        quant: further policy fields as the hook takes them (``first_layer_bits``,
            ``quantize_final``, ``fp_layers``, ``weight``, ...); ``w_bits`` comes from bits.
        layers: regex (``re.fullmatch``) of the quantized layers to test; None = all.
        with_ap: rank by COCO AP drop (else by the global-loss proxy).
        suggest_bits: bits suggested for the most sensitive layers (2..8).
        top_k: suggest at most this many layers.
        min_drop: suggest only layers whose drop exceeds this (with AP also the largest
            AP gain of any single layer: the evaluation noise of the few images).
        proxy: thresholds of the FP-vs-quantized measures.
    """
    bits: int = 4
    a_bits: int | None = None
    quant: dict = field(default_factory=dict)
    layers: str | None = None
    with_ap: bool = False
    suggest_bits: int = 8
    top_k: int = 3
    min_drop: float = 0.0
    proxy: ProxyConfig = field(default_factory=ProxyConfig)

    def __post_init__(self) -> None:
        for name in ('bits', 'suggest_bits'):
            if not 2 <= getattr(self, name) <= 8:
                raise ValueError(f'{name}={getattr(self, name)} is out of range; allowed 2..8')
        if self.a_bits is not None and not 2 <= self.a_bits <= 16:
            raise ValueError(f'a_bits={self.a_bits} is out of range; allowed 2..16')
        if 'w_bits' in self.quant or 'a_bits' in self.quant:
            raise ValueError('quant: set the bits with bits / a_bits, not w_bits / a_bits')
        if self.top_k < 0:
            raise ValueError(f'top_k={self.top_k} must be >= 0')


@dataclass
class SensitivityResult:
    """Rows sorted by drop (largest first); the suggested overrides."""
    table: Table
    measure: str
    overrides: dict[str, dict]
    suggestion: str
    files: list[Path] = field(default_factory=list)


def format_overrides(overrides: dict[str, dict]) -> str:
    """``quant=dict(overrides={'name': dict(w_bits=8)})`` as a config line."""
    items = ', '.join(f'{name!r}: dict({", ".join(f"{k}={v}" for k, v in spec.items())})'
                      for name, spec in overrides.items())
    return f'quant=dict(overrides={{{items}}})'


def run_sensitivity(bench: DetectorBench, cfg: SensitivityConfig,
                    out_dir: str | Path | None = None) -> SensitivityResult:
    """Quantize one layer at a time; ``sensitivity.csv`` / ``.png`` in ``out_dir``.

    The bench's model is left float: a deep copy is converted.
    """
    parts = layer_parts(bench.model, bench.adapter)
    part_of = {n: p for p, names in parts.items() for n in names}
    ref = bench.snapshot(with_ap=cfg.with_ap)
    qbench = bench.with_model(copy.deepcopy(bench.model))
    model = qbench.model
    quant = dict(cfg.quant, w_bits=cfg.bits, a_bits=cfg.a_bits or 8)
    policy = build_policy(quant, qbench.adapter)
    report = quantize_model(model, policy,
                            example_forward=lambda m: qbench.adapter.forward(m, qbench.batches[0]))
    logger.info(report.summary())
    if cfg.a_bits is not None:
        set_quant_state(model, weight=False, input=True)
        init_activation_quantizers(
            model, lambda: [qbench.adapter.forward(model, b) for b in qbench.batches])
    set_quant_state(model, weight=False, input=False)
    measure = 'mAP' if cfg.with_ap else None
    rows = []
    layers = [(n, m) for n, m in iter_quant_modules(model)
              if cfg.layers is None or re.fullmatch(cfg.layers, n)]
    if not layers:
        raise ValueError(f'layers={cfg.layers!r} matches no quantized layer; quantized: '
                         f'{[n for n, _ in iter_quant_modules(model)]}')
    for i, (name, qm) in enumerate(layers):
        qm.set_quant(weight=True, input=cfg.a_bits is not None)
        try:
            cur = qbench.snapshot(with_ap=cfg.with_ap)
        finally:
            qm.set_quant(weight=False, input=False)
        row = compare_snapshots(ref, cur, cfg.proxy, adapter=qbench.adapter)
        measure = measure or ('out_gl' if row.get('out_gl') is not None else 'det_gl')
        drop = ref.ap['mAP'] - row['mAP'] if cfg.with_ap else row[measure]
        rows.append(dict(layer=name, part=part_of.get(name, '-'), w_bits=qm.w_bits,
                         a_bits=qm.a_bits if cfg.a_bits is not None else None, drop=drop, **row))
        logger.info(f'[{i + 1}/{len(layers)}] {name}: drop {drop:.4f}')
    tie = 'out_gl' if rows and rows[0].get('out_gl') is not None else 'det_gl'
    rows.sort(key=lambda r: (-_finite(r['drop']), -_finite(r[tie])))  # ties: by the proxy
    columns = ['rank', 'layer', 'part', 'w_bits', 'a_bits', 'drop'] + [
        k for k in (rows[0] if rows else {}) if k not in ('layer', 'part', 'w_bits', 'a_bits',
                                                           'drop', 'mAP_50', 'mAP_75')]
    what = 'mAP drop' if cfg.with_ap else f'{measure} (global loss vs FP)'
    table = Table(columns, title=f'one layer quantized at a time: drop = {what}'
                                 + (f'; FP mAP {ref.ap["mAP"]:.4f}' if ref.ap else ''))
    for rank, row in enumerate(rows, 1):
        table.add(rank=rank, **{k: v for k, v in row.items() if k in columns})
    spec = {'w_bits': cfg.suggest_bits}
    if cfg.a_bits is not None:
        spec['a_bits'] = max(cfg.suggest_bits, cfg.a_bits)
    # AP of a few images is coarse: a layer that "improves" AP by x shows the noise level
    floor = max([0.0] + [-r['drop'] for r in rows]) if cfg.with_ap else 0.0
    threshold = max(cfg.min_drop, floor)
    picked = [r['layer'] for r in rows if r['drop'] > threshold][:cfg.top_k]
    overrides = {name: dict(spec) for name in picked}
    QuantPolicy(overrides=overrides)  # the suggestion must be a valid policy field
    if overrides:
        suggestion = format_overrides(overrides)
    elif floor > cfg.min_drop:
        suggestion = (f'no override suggested: no AP drop exceeds {floor:.4f}, the largest AP '
                      f'gain of a single quantized layer on {bench.num_images} images (the '
                      'evaluation noise); rank by the global-loss proxy (no --num-images), '
                      'use more images or fewer bits')
    else:
        suggestion = f'no override suggested: no layer drops more than {cfg.min_drop}'
    result = SensitivityResult(table, 'mAP' if cfg.with_ap else measure, overrides, suggestion)
    if out_dir is not None:
        out_dir = Path(out_dir)
        result.files.append(table.to_csv(out_dir / 'sensitivity.csv'))
        result.files.append(plot_sensitivity(
            table, out_dir / 'sensitivity.png',
            title=f'{type(bench.model).__name__}: W{cfg.bits}'
                  + (f'A{cfg.a_bits}' if cfg.a_bits else '') + ' one layer at a time',
            xlabel=what))
    return result


def _finite(x: float) -> float:
    return -math.inf if x is None or math.isnan(x) else x


_COLORS = {'cls': 'tab:blue', 'reg': 'tab:red', 'shared': 'tab:green', 'backbone': 'tab:gray',
           'neck': 'tab:purple', '-': 'black'}


def plot_sensitivity(table: Table, path: str | Path, *, title: str = '',
                     xlabel: str = 'drop') -> Path:
    """Horizontal bars, most sensitive layer on top, coloured by part."""
    rows = table.rows
    fig, axes = new_figure(1, 1, size=(7.5, max(2.5, 0.24 * len(rows) + 1.2)))
    ax = axes[0][0]
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r['drop'] for r in rows], color=[_COLORS.get(r['part'], 'black') for r in rows])
    ax.set_yticks(ys, [f'{r["layer"]} (W{r["w_bits"]})' for r in rows], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.axvline(0, color='black', linewidth=0.8)
    handles = [Patch(color=_COLORS[p], label=p) for p in PARTS
               if any(r['part'] == p for r in rows)]
    ax.legend(handles=handles, fontsize=8, loc='lower right')
    ax.grid(True, axis='x', alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
