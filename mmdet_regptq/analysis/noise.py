"""Observation 1: how sensitive are the head's classification and regression branches to
weight noise?

Each part's weights (``cls``, ``reg``; optionally ``shared``, ``backbone``, ``neck``; see
:mod:`.branches`) get additive noise of growing magnitude, one part at a time; the
detector's outputs are compared with the float model's (:mod:`.metrics`) and, on a val
subset, its COCO AP is measured.

Noise: ``level`` is relative to each output channel's weight std ``sigma_c``; Gaussian noise
``N(0, (level * sigma_c)^2)`` and uniform noise ``U(-a, a)`` with ``a = sqrt(3) * level *
sigma_c`` have the SAME std, so the two kinds differ only in shape (uniform is what
rounding to a grid produces). ``eq_bits`` translates a level into the bit width whose
rounding noise has that std on the median channel of the part: rounding a channel of range
``R`` to ``2^b`` levels adds uniform noise of std ``R / (2^b - 1) / sqrt(12)``.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from mmdet_regptq.analysis.bench import DetectorBench
from mmdet_regptq.analysis.branches import PARTS, layer_parts, weighted_layers
from mmdet_regptq.analysis.metrics import ProxyConfig, compare_snapshots
from mmdet_regptq.analysis.report import Table, new_figure, save_figure

__all__ = ['NOISE_KINDS', 'NoiseConfig', 'NoiseResult', 'run_noise', 'perturbed_weights',
           'equivalent_bits', 'plot_noise', 'noise_verdict']

logger = logging.getLogger(__name__)

NoiseFn = Callable[[Tensor, torch.Generator], Tensor]


def _gaussian(std: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randn(std.shape, generator=gen) * std


def _uniform(std: Tensor, gen: torch.Generator) -> Tensor:
    return (torch.rand(std.shape, generator=gen) * 2 - 1) * (math.sqrt(3.0) * std)


#: Noise shapes by name: ``fn(std, generator) -> noise`` with that elementwise std.
NOISE_KINDS: dict[str, NoiseFn] = {'gaussian': _gaussian, 'uniform': _uniform}


@dataclass(frozen=True)
class NoiseConfig:
    """What the noise sweep does.

    Args:
        levels: noise std relative to each output channel's weight std (> 0, increasing).
        kinds: keys of ``NOISE_KINDS``.
        parts: parts to perturb, one at a time (keys of ``branches.PARTS``).
        repeats: noise draws per point (results averaged).
        seed: seed of the draws.
        with_ap: measure COCO AP at every point (the bench needs an evaluator).
        include_final: perturb the final prediction layers too (``retina_reg``, ``fc_cls``).
        proxy: thresholds of the FP-vs-noisy measures.
    """
    levels: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    kinds: tuple[str, ...] = ('gaussian', 'uniform')
    parts: tuple[str, ...] = ('cls', 'reg')
    repeats: int = 1
    seed: int = 0
    with_ap: bool = False
    include_final: bool = True
    proxy: ProxyConfig = field(default_factory=ProxyConfig)

    def __post_init__(self) -> None:
        if not self.levels or any(not v > 0 for v in self.levels):
            raise ValueError(f'levels={self.levels} must be non-empty and > 0')
        for kind in self.kinds:
            if kind not in NOISE_KINDS:
                raise ValueError(f'kinds: {kind!r} is unknown; allowed: {sorted(NOISE_KINDS)}')
        for part in self.parts:
            if part not in PARTS:
                raise ValueError(f'parts: {part!r} is unknown; allowed: {list(PARTS)}')
        if not self.kinds or not self.parts:
            raise ValueError('kinds and parts must not be empty')
        if self.repeats < 1:
            raise ValueError(f'repeats={self.repeats} must be >= 1')


@dataclass
class NoiseResult:
    """Rows per (part, kind, level) plus the FP row; files written; verdict lines."""
    table: Table
    parts: dict[str, list[str]]
    verdict: list[str]
    files: list[Path] = field(default_factory=list)


def _channel_std(w: Tensor) -> Tensor:
    """Std per output channel, broadcast to the weight: ``[C_out, ...] -> [C_out, 1, ...]``."""
    std = w.detach().flatten(1).float().std(1)
    return std.view(-1, *([1] * (w.dim() - 1))).expand_as(w)


@contextmanager
def perturbed_weights(modules: list[nn.Module], kind: str, level: float,
                      generator: torch.Generator) -> Iterator[None]:
    """Add noise to the weights of ``modules`` in place; restore them on exit."""
    noise_fn = NOISE_KINDS[kind]
    saved = [m.weight.detach().clone() for m in modules]
    try:
        with torch.no_grad():
            for m in modules:
                noise = noise_fn(level * _channel_std(m.weight).cpu(), generator)
                m.weight.add_(noise.to(m.weight))
        yield
    finally:
        with torch.no_grad():
            for m, w in zip(modules, saved):
                m.weight.copy_(w)


def equivalent_bits(modules: list[nn.Module], level: float) -> float:
    """Bit width whose rounding noise has std ``level * sigma_c`` on the median channel."""
    bits = []
    for m in modules:
        w = m.weight.detach().flatten(1).float()
        ratio = (w.max(1).values - w.min(1).values) / (math.sqrt(12) * level * w.std(1))
        bits.append(torch.log2(ratio.clamp(min=0) + 1))
    return float(torch.cat(bits).median()) if bits else math.nan


def run_noise(bench: DetectorBench, cfg: NoiseConfig, out_dir: str | Path | None = None,
              *, parts: dict[str, list[str]] | None = None) -> NoiseResult:
    """Sweep the noise over the parts; write ``noise.csv`` and ``noise.png`` to ``out_dir``.

    Args:
        bench: the detector (float weights) and its images.
        cfg: the sweep.
        out_dir: where the table and the figure go (None = nothing written).
        parts: layer names per part (default: :func:`branches.layer_parts`).
    """
    parts = parts or layer_parts(bench.model, bench.adapter, include_final=cfg.include_final)
    empty = [p for p in cfg.parts if not parts.get(p)]
    if empty:
        raise ValueError(f'{type(bench.model).__name__} has no layer in part(s) {empty}; '
                         'pass cls/reg patterns to name them')
    modules = weighted_layers(bench.model)
    ref = bench.snapshot(with_ap=cfg.with_ap)
    fp_row = compare_snapshots(ref, ref, cfg.proxy, adapter=bench.adapter)
    if ref.ap is not None:
        fp_row.update(ref.ap)
    table = Table(['part', 'noise', 'level', 'eq_bits'] + list(fp_row),
                  title=f'weight noise vs FP ({bench.num_images} images)')
    table.add(part='fp', noise='-', level=0.0, **fp_row)
    for p_idx, part in enumerate(cfg.parts):
        mods = [modules[n] for n in parts[part]]
        logger.info(f'noise on {part}: {len(mods)} layers ({", ".join(parts[part])})')
        for k_idx, kind in enumerate(cfg.kinds):
            for l_idx, level in enumerate(cfg.levels):
                runs = []
                for r in range(cfg.repeats):
                    gen = torch.Generator().manual_seed(
                        cfg.seed * 1_000_003 + ((p_idx * 31 + k_idx) * 131 + l_idx) * 97 + r)
                    with perturbed_weights(mods, kind, level, gen):
                        cur = bench.snapshot(with_ap=cfg.with_ap)
                    runs.append(compare_snapshots(ref, cur, cfg.proxy, adapter=bench.adapter))
                row = {k: sum(run[k] for run in runs) / len(runs) for k in runs[0]}
                table.add(part=part, noise=kind, level=level,
                          eq_bits=equivalent_bits(mods, level), **row)
                logger.info(f'{part} {kind} {level:g}: ' + ', '.join(
                    f'{k} {row[k]:.4f}' for k in ('out_gl', 'det_gl', 'mAP') if k in row))
    verdict = noise_verdict(table, with_ap=cfg.with_ap)
    result = NoiseResult(table, parts, verdict)
    if out_dir is not None:
        out_dir = Path(out_dir)
        result.files.append(table.to_csv(out_dir / 'noise.csv'))
        title = f'{type(bench.model).__name__}: weight noise per branch'
        result.files.append(plot_noise(table, out_dir / 'noise.png', title=title))
    return result


def _measures(table: Table) -> list[tuple[str, str]]:
    """(column, label) of the plotted measures: per-prediction ones when available."""
    rows = [r for r in table.rows if r['part'] != 'fp']
    has_out = any(r.get('out_cls') is not None for r in rows)
    pre = 'out' if has_out else 'det'
    where = 'per prediction, before NMS' if has_out else 'matched final detections'
    out = [(f'{pre}_cls', f'classification change\n(|score change| of the FP class, {where})'),
           (f'{pre}_box', f'box change\n(L1 / image size, {where})'),
           (f'{pre}_gl', 'global loss L_G (FGIC)' if has_out else 'global-loss proxy')]
    if any(r.get('mAP') is not None for r in rows):
        out += [('mAP', 'COCO mAP (val subset)'), ('mAP_75', 'COCO AP@0.75 (val subset)')]
    return out


_COLORS = {'cls': 'tab:blue', 'reg': 'tab:red', 'shared': 'tab:green', 'backbone': 'tab:gray',
           'neck': 'tab:purple'}
_STYLES = {'gaussian': '-', 'uniform': '--'}


def plot_noise(table: Table, path: str | Path, *, title: str = '') -> Path:
    """One panel per measure; colour = part, line style = noise kind; log x."""
    measures = _measures(table)
    ncols = min(len(measures), 3)
    nrows = math.ceil(len(measures) / ncols)
    fig, axes = new_figure(ncols, nrows, size=(4.8, 3.6))
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(measures):]:
        ax.set_visible(False)
    fp = next(r for r in table.rows if r['part'] == 'fp')
    rows = [r for r in table.rows if r['part'] != 'fp']
    levels = sorted({r['level'] for r in rows})
    series = sorted({(r['part'], r['noise']) for r in rows},
                    key=lambda s: (PARTS.index(s[0]), s[1]))
    for ax, (col, label) in zip(flat, measures):
        for part, kind in series:
            pts = [(r['level'], r[col]) for r in rows
                   if r['part'] == part and r['noise'] == kind and r.get(col) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, _STYLES.get(kind, ':'), color=_COLORS.get(part), marker='o',
                        markersize=3.5, label=f'{part} / {kind}')
        if col.startswith('mAP') and fp.get(col) is not None:
            ax.axhline(fp[col], color='black', linestyle=':', linewidth=1, label='FP')
        ax.set_xscale('log')
        ax.set_xticks(levels, [f'{v:g}' for v in levels])
        ax.minorticks_off()
        ax.set_xlabel('noise std / channel weight std')
        ax.set_title(label, fontsize=9)
        ax.grid(True, which='both', alpha=0.3)
    if len(flat) > len(measures):  # a free panel: the legend goes there
        spare = flat[len(measures)]
        spare.set_visible(True)
        spare.set_axis_off()
        spare.legend(*flat[0].get_legend_handles_labels(), loc='center', fontsize=10,
                     title='part / noise (same std)')
    else:
        flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def noise_verdict(table: Table, *, with_ap: bool) -> list[str]:
    """Plain-language comparison of the parts and of the noise kinds, measure by measure."""
    rows = [r for r in table.rows if r['part'] != 'fp']
    fp = next(r for r in table.rows if r['part'] == 'fp')
    measures = [m for m in ('out_gl', 'det_gl', 'det_miss') if rows and rows[0].get(m) is not None]
    if with_ap:
        measures = ['mAP', 'mAP_75'] + measures

    def damage(r: dict, m: str) -> float:
        return fp[m] - r[m] if m.startswith('mAP') else r[m]

    def pick(part: str, kind: str) -> dict[float, dict]:
        return {r['level']: r for r in rows if r['part'] == part and r['noise'] == kind}

    lines = []
    kinds = sorted({r['noise'] for r in rows})
    for kind in kinds:
        cls, reg = pick('cls', kind), pick('reg', kind)
        levels = sorted(set(cls) & set(reg))
        for m in measures:
            if not levels:
                break
            worse = sum(damage(reg[lv], m) > damage(cls[lv], m) for lv in levels)
            top = levels[-1]
            unit = ' (AP drop)' if m.startswith('mAP') else ''
            lines.append(f'{kind:8s} {m:8s}: reg worse than cls at {worse}/{len(levels)} levels; '
                         f'at level {top:g}: reg {damage(reg[top], m):.4f} vs cls '
                         f'{damage(cls[top], m):.4f}{unit}')
    for part in sorted({r['part'] for r in rows}, key=PARTS.index):
        gauss, unif = pick(part, 'gaussian'), pick(part, 'uniform')
        levels = sorted(set(gauss) & set(unif))
        for m in measures[:1]:
            if levels:
                worse = sum(damage(unif[lv], m) > damage(gauss[lv], m) for lv in levels)
                lines.append(f'{part:8s} {m:8s}: uniform worse than gaussian (same std) at '
                             f'{worse}/{len(levels)} levels')
    return lines
