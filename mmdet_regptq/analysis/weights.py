"""Observation 3: are the head's weights Laplace-like, and what does a uniform INT-b grid
clip compared with LLAQ?

Per layer of the chosen parts (default: the head's ``cls`` and ``reg`` branches):
histogram with a fitted Gaussian (mean, std) and Laplace (median, mean |w - median|), both
maximum-likelihood; the excess kurtosis (Gaussian 0, Laplace 3) pooled over the layer and
the median over output channels; ``ll_gain``, the Laplace minus the Gaussian mean
log-likelihood per weight (> 0: Laplace fits better); and for each quantizer (the min-error
uniform per-channel grid; LLAQ when registered) the fraction of weights outside the grid's
range (``clip_*``) and the relative error ``||q(w) - w||^2 / ||w||^2`` (``err_*``).
A grid's range per channel is found by quantizing +-10 x max|w|: whatever the quantizer,
the result is its extreme levels.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mmdet_regptq.analysis.branches import PARTS, layer_parts, weighted_layers
from mmdet_regptq.analysis.report import Table, new_figure, save_figure
from mmdet_regptq.registry import QUANTIZERS, build_from

__all__ = ['WeightsConfig', 'WeightsResult', 'run_weights', 'weight_stats', 'clip_fraction',
           'plot_weights']

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsConfig:
    """What the weight statistics use.

    Args:
        bits: weight bits of the grids (2..8).
        parts: parts whose layers are shown (keys of ``branches.PARTS``).
        include_final: include the final prediction layers.
        uniform: the uniform quantizer config (``bits`` added); default: per-channel
            asymmetric with the min-MSE range search ("min-error uniform grid").
        llaq: the LLAQ quantizer config (``bits`` added), or None to skip LLAQ.
        bins: histogram bins.
    """
    bits: int = 4
    parts: tuple[str, ...] = ('cls', 'reg')
    include_final: bool = True
    uniform: dict = field(default_factory=lambda: dict(
        type='Uniform', per_channel=True, symmetric=False, scale_method='mse'))
    llaq: dict | None = field(default_factory=lambda: dict(type='LLAQ', per_channel=True))
    bins: int = 80

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f'bits={self.bits} is out of range; allowed 2..8')
        for part in self.parts:
            if part not in PARTS:
                raise ValueError(f'parts: {part!r} is unknown; allowed: {list(PARTS)}')
        if self.bins < 5:
            raise ValueError(f'bins={self.bins} must be >= 5')


@dataclass
class WeightsResult:
    table: Table
    notes: list[str]
    files: list[Path] = field(default_factory=list)


def clip_fraction(w: Tensor, quantizer: torch.nn.Module) -> tuple[float, float]:
    """``(fraction of weights outside the grid's range, relative squared error)``.

    Args:
        w: weight ``[C_out, ...]``; the quantizer is already initialised from it.
        quantizer: any weight quantizer (per channel or per tensor).
    """
    with torch.no_grad():
        big = 10 * float(w.abs().max()) + 1.0
        hi = quantizer(torch.full_like(w, big)).flatten(1).amax(1, keepdim=True)
        lo = quantizer(torch.full_like(w, -big)).flatten(1).amin(1, keepdim=True)
        flat = w.flatten(1)
        tol = 1e-6 * (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True))
        clipped = (flat > hi + tol) | (flat < lo - tol)
        err = float(((quantizer(w) - w) ** 2).sum() / (w ** 2).sum().clamp(min=1e-30))
    return float(clipped.float().mean()), err


def _excess_kurtosis(x: Tensor) -> Tensor:
    """Along the last dim."""
    d = x - x.mean(-1, keepdim=True)
    return (d ** 4).mean(-1) / (d ** 2).mean(-1).clamp(min=1e-30) ** 2 - 3


def weight_stats(w: Tensor) -> dict[str, float]:
    """Fits and shape statistics of one weight tensor ``[C_out, ...]``."""
    w = w.detach().float()
    x = w.flatten()
    std = float(x.std())
    med = float(x.median())
    b = float((x - med).abs().mean())
    ll_gauss = -0.5 * math.log(2 * math.pi * max(std, 1e-30) ** 2) - 0.5
    ll_lap = -math.log(2 * max(b, 1e-30)) - 1
    return {'numel': x.numel(), 'mean': float(x.mean()), 'std': std, 'median': med,
            'laplace_b': b, 'kurtosis': float(_excess_kurtosis(x)),
            'kurtosis_ch': float(_excess_kurtosis(w.flatten(1)).median()),
            'll_gain': ll_lap - ll_gauss}


def _quantizer(cfg: dict, bits: int, w: Tensor) -> torch.nn.Module:
    q = build_from(QUANTIZERS, dict(cfg), 'quantizer', bits=bits)
    q.init_from(w.detach())
    return q.to(w.device)


def run_weights(model: torch.nn.Module, cfg: WeightsConfig, out_dir: str | Path | None = None,
                *, adapter=None, parts: dict[str, list[str]] | None = None) -> WeightsResult:
    """Statistics per layer; ``weights.csv`` and ``weights.png`` in ``out_dir``."""
    parts = parts or layer_parts(model, adapter, include_final=cfg.include_final)
    modules = weighted_layers(model)
    notes = []
    llaq = cfg.llaq
    if llaq is not None and QUANTIZERS.get(llaq['type']) is None:
        notes.append(f'{llaq["type"]} is not registered (yet): its columns are left empty')
        llaq = None
    columns = ['layer', 'part', 'numel', 'std', 'kurtosis', 'kurtosis_ch', 'll_gain',
               'clip_uniform', 'err_uniform', 'clip_llaq', 'err_llaq']
    table = Table(columns, title=f'weights: min-error uniform INT{cfg.bits} vs LLAQ')
    hists = {}
    for part in cfg.parts:
        if not parts.get(part):
            notes.append(f'part {part!r} has no layer')
        for name in parts.get(part, []):
            w = modules[name].weight.detach().float().cpu()
            stats = weight_stats(w)
            row = dict(layer=name, part=part, **{k: stats[k] for k in
                                                 ('numel', 'std', 'kurtosis', 'kurtosis_ch',
                                                  'll_gain')})
            row['clip_uniform'], row['err_uniform'] = clip_fraction(w, _quantizer(cfg.uniform,
                                                                                 cfg.bits, w))
            if llaq is not None:
                row['clip_llaq'], row['err_llaq'] = clip_fraction(w, _quantizer(llaq, cfg.bits, w))
            table.add(**row)
            hists[name] = (w.flatten(), stats, row)
    for part in cfg.parts:
        rows = [r for r in table.rows if r['part'] == part]
        if rows:
            mean = lambda k: sum(r[k] for r in rows if r.get(k) is not None) / len(rows)  # noqa
            notes.append(f'{part}: {len(rows)} layers, mean excess kurtosis {mean("kurtosis"):.2f}'
                         f' (per channel {mean("kurtosis_ch"):.2f}), Laplace fits better in '
                         f'{sum(r["ll_gain"] > 0 for r in rows)}/{len(rows)}, uniform INT'
                         f'{cfg.bits} clips {100 * mean("clip_uniform"):.2f}% on average'
                         + (f', LLAQ {100 * mean("clip_llaq"):.2f}%' if llaq else ''))
    result = WeightsResult(table, notes)
    if out_dir is not None:
        out_dir = Path(out_dir)
        result.files.append(table.to_csv(out_dir / 'weights.csv'))
        result.files.append(plot_weights(hists, cfg, out_dir / 'weights.png',
                                         title=f'{type(model).__name__}: head weights'))
    return result


def plot_weights(hists: dict[str, tuple[Tensor, dict, dict]], cfg: WeightsConfig,
                 path: str | Path, *, title: str = '') -> Path:
    """A column per part, a panel per layer: histogram, Laplace and Gaussian fits."""
    cols = [p for p in cfg.parts if any(r['part'] == p for _, _, r in hists.values())]
    by_part = {p: [n for n, (_, _, r) in hists.items() if r['part'] == p] for p in cols}
    nrows = max((len(v) for v in by_part.values()), default=1)
    fig, axes = new_figure(max(len(cols), 1), nrows, size=(4.2, 2.6))
    for c, part in enumerate(cols):
        for r in range(nrows):
            ax = axes[r][c]
            if r >= len(by_part[part]):
                ax.set_visible(False)
                continue
            name = by_part[part][r]
            x, stats, row = hists[name]
            lo, hi = torch.quantile(x, torch.tensor([0.0005, 0.9995])).tolist()
            ax.hist(x.numpy(), bins=cfg.bins, range=(lo, hi), density=True, color='0.75')
            t = torch.linspace(lo, hi, 300)
            gauss = torch.exp(-0.5 * ((t - stats['mean']) / stats['std']) ** 2) / (
                stats['std'] * math.sqrt(2 * math.pi))
            b = stats['laplace_b']
            lap = torch.exp(-(t - stats['median']).abs() / b) / (2 * b)
            ax.plot(t.numpy(), lap.numpy(), color='tab:red', label='Laplace fit')
            ax.plot(t.numpy(), gauss.numpy(), color='tab:blue', linestyle='--',
                    label='Gaussian fit')
            text = (f'kurtosis {stats["kurtosis"]:.2f}\nclip U{cfg.bits} '
                    f'{100 * row["clip_uniform"]:.1f}%')
            if row.get('clip_llaq') is not None:
                text += f'\nclip LLAQ {100 * row["clip_llaq"]:.1f}%'
            ax.text(0.02, 0.97, text, transform=ax.transAxes, va='top', fontsize=7.5,
                    bbox=dict(facecolor='white', alpha=0.8, edgecolor='none'))
            ax.set_title(f'[{part}] {name}', fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc='upper right')
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
