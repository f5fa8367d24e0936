"""PD-Quant (Liu et al., CVPR 2023): prediction difference loss + distribution correction.

As its official code (hustvl/PD-Quant): QDrop's reconstruction (drop 0.5, FP input
mixing), plus ``KL(softmax(fp / T) || softmax(q / T)) / lambda_r`` between the final
predictions of the full-precision network and of the network with the unit quantized and
every later unit FP, computed from the unit's purely quantized input (T = 4,
lambda_r = 0.1), and the Distribution Correction (DC) of the FP unit input.

DC, officially: for each calibration batch, the FP input of a unit is moved (Adam,
lr 1e-3, 500 steps, ReduceLROnPlateau) so that the per-sample channel mean / std of the
input of every BatchNorm inside the FP unit match that BN's running mean / std, under a
penalty ``lp_loss(x', x) / lambda_c`` (lambda_c = 0.02); the corrected input feeds the
QDrop mixing and the FP unit output of it is the reconstruction target.

Here BN is folded into the convolutions before calibration, so the running statistics
are gone. The closest equivalent kept: the folded conv's output *is* the BN's output, so
the per-sample channel mean / std of every conv output inside the unit are matched to
that output's population mean / std over the calibration images (what the running
statistics estimate, from training images, which the calibration images are). The loss
then lives in the BN-output scale instead of the BN-input one (a per-channel factor
``(gamma / sigma)^2`` on each term). DC runs on the units inside ``dc_scopes`` (the
backbone, where the bundled detectors' convs carried their BN); necks and heads of mmdet
detectors have no BN (FCOS's GroupNorm is no BN), so PD-Quant's DC would do nothing there.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ...registry import PTQ_METHODS
from ...quant.utils import removing
from .._tree import detach_to, float_tensors, tree_map
from .._utils import quant_disabled, requires_grad
from .. import dist as calib_dist
from ..cache import ActivationCache, CacheEntry
from ..capture import GradLoss
from ..losses import PredictionKL, ReconLoss
from ..units import ReconUnit
from .base import check_int
from .qdrop import QDrop

__all__ = ['PDQuant', 'distribution_correction']


@PTQ_METHODS.register_module()
class PDQuant(QDrop):
    """QDrop + PD-Quant's prediction KL and distribution correction (module docstring).

    The final outputs come from a :class:`TailRunner` forward of the rest of the network
    (later units still FP). ``calibrate(output_fn=...)`` turns raw outputs into logits
    ``[N, C]``.

    Args:
        temperature: ``T`` of the KL (official 4).
        lambda_r: the KL is divided by it (official 0.1).
        sigmoid: per-class binary KL (detection heads with sigmoid scores) or the softmax
            KL; ``None``: set by the engine from the detector adapter's ``uses_sigmoid``
            (:meth:`set_output_defaults`); a direct ``calibrate`` call must pass it.
        dc: run the distribution correction.
        dc_iters: Adam steps of DC per calibration batch (official 500).
        dc_lr: Adam lr of DC (official 1e-3).
        lambda_c: weight divisor of DC's distance to the original input (official 0.02).
        dc_scopes: module-name prefixes of the units that get DC; ``None``: ``block_scopes``.
        **kwargs: see :class:`QDrop`.
    """

    def __init__(self, *, temperature: float = 4.0, lambda_r: float = 0.1,
                 sigmoid: bool | None = None, dc: bool = True, dc_iters: int = 500,
                 dc_lr: float = 1e-3, lambda_c: float = 0.02,
                 dc_scopes: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, value in (('temperature', temperature), ('lambda_r', lambda_r),
                            ('lambda_c', lambda_c), ('dc_lr', dc_lr)):
            if not value > 0:
                raise ValueError(f'{name}={value!r} must be > 0')
        check_int('dc_iters', dc_iters, 0)
        if sigmoid is not None and not isinstance(sigmoid, bool):
            raise ValueError(f'sigmoid={sigmoid!r} must be True, False or None')
        self.temperature = temperature
        self.lambda_r = lambda_r
        self.sigmoid = sigmoid
        self.dc = dc
        self.dc_iters = dc_iters
        self.dc_lr = dc_lr
        self.lambda_c = lambda_c
        self.dc_scopes = tuple(self.block_scopes if dc_scopes is None else dc_scopes)

    def set_output_defaults(self, *, sigmoid: bool) -> None:
        """Fill ``sigmoid`` from the detector adapter when it was not given."""
        if self.sigmoid is None:
            self.sigmoid = bool(sigmoid)

    def losses(self, unit: ReconUnit, *, output_fn: Callable[[Any], Tensor] | None,
               global_loss: GradLoss | None) -> list[ReconLoss]:
        if self.sigmoid is None:
            raise ValueError('PDQuant(sigmoid=None): pass sigmoid=True (sigmoid class '
                             'scores) or False (softmax), or calibrate through the engine, '
                             "which sets it from the detector adapter's uses_sigmoid")
        return super().losses(unit, output_fn=output_fn, global_loss=global_loss) + [
            PredictionKL(output_fn=output_fn, temperature=self.temperature,
                         sigmoid=self.sigmoid, weight=1.0 / self.lambda_r)]

    def correct_cache(self, unit: ReconUnit, cache: ActivationCache) -> ActivationCache:
        """Distribution correction of the unit's FP inputs and targets."""
        if not self.dc or self.dc_iters == 0 or not _in_scopes(unit.name, self.dc_scopes):
            return cache
        return distribution_correction(unit, cache, iters=self.dc_iters, lr=self.dc_lr,
                                       lambda_c=self.lambda_c)


def _in_scopes(name: str, scopes: Sequence[str]) -> bool:
    return any(name == s or name.startswith(s + '.') for s in scopes)


@contextlib.contextmanager
def _layer_outputs(unit: ReconUnit, store: list[Tensor]) -> Iterator[None]:
    """Append the output tensor of every layer of ``unit`` (``[N, C, ...]``) to ``store``."""
    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor) and out.dim() >= 2:
            store.append(out)

    with removing([]) as handles:
        for _, layer in unit.layers:
            handles.append(layer.register_forward_hook(hook))
        yield


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample channel mean and std ``[N, C]`` of ``[N, C, ...]`` (PD-Quant's DC)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(dim=2), torch.sqrt(flat.var(dim=2) + 1e-6)


def _stat_loss(out: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(|mu - mean_n|^2 + |sigma - std_n|^2) / N`` as PD-Quant's DC ``own_loss``."""
    m, sd = _channel_stats(out)
    return ((m - mean).norm() ** 2 + (sd - std).norm() ** 2) / out.shape[0]


def distribution_correction(unit: ReconUnit, cache: ActivationCache, *, iters: int = 500,
                            lr: float = 1e-3, lambda_c: float = 0.02) -> ActivationCache:
    """PD-Quant's DC on BN-folded layers (module docstring).

    Returns:
        A new cache (``cache`` is cleared) whose entries have the corrected FP input as
        ``extras['fp_args']`` and the FP unit output of it as ``output``; ``cache`` itself
        when the unit has no layer output to match.
    """
    if len(cache) == 0 or 'fp_args' not in cache[0].extras:
        raise ValueError(f'distribution_correction({unit.name!r}): the cache has no FP '
                         'inputs (capture with fp_inputs=True)')
    device = cache.device
    # population statistics of every layer output over the calibration set (FP unit)
    sums: list[list[Tensor]] = []
    with torch.no_grad(), quant_disabled(unit.module):
        for i in range(len(cache)):
            entry = cache[i]
            outs: list[Tensor] = []
            with _layer_outputs(unit, outs):
                unit(*detach_to(entry.extras['fp_args'], device),
                     **detach_to(entry.kwargs, device))
            per = [(o.transpose(0, 1).reshape(o.shape[1], -1).sum(1),
                    o.transpose(0, 1).reshape(o.shape[1], -1).pow(2).sum(1),
                    o.numel() // o.shape[1]) for o in outs]
            if not sums:
                sums = [[s, q, torch.tensor(float(n))] for s, q, n in per]
            else:
                for acc, (s, q, n) in zip(sums, per):
                    acc[0] += s
                    acc[1] += q
                    acc[2] += n
    if not sums:
        return cache
    targets = []
    # data-parallel: the population is every rank's images (one process: as is)
    for s, q, n in ([calib_dist.all_reduce_sum(t) for t in acc] for acc in sums):
        mean = s / n
        targets.append((mean, torch.sqrt((q / n - mean ** 2).clamp(min=0) + 1e-6)))
    params = list(unit.module.parameters())
    out = ActivationCache(max_bytes=cache.max_bytes, spill_dir=cache._spill_root,
                          device=cache.device)
    keys = {index: key for key, index in cache.keys().items()}
    for i in range(len(cache)):
        entry = cache[i]
        fp_args = detach_to(entry.extras['fp_args'], device)
        kwargs = detach_to(entry.kwargs, device)
        originals = float_tensors(fp_args)
        corrected = [t.clone().requires_grad_(True) for t in originals]
        opt = torch.optim.Adam(corrected, lr=lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-5, patience=100)
        slots = iter(corrected)
        args = tree_map(lambda t: next(slots) if t.is_floating_point() else t, fp_args)
        with quant_disabled(unit.module), requires_grad(params, False), torch.enable_grad():
            for _ in range(iters):
                outs: list[Tensor] = []
                with _layer_outputs(unit, outs):
                    unit(*args, **kwargs)
                stat = sum(_stat_loss(o, m, sd) for (m, sd), o in zip(targets, outs))
                constraint = sum((c - x).pow(2).sum(1).mean()
                                 for c, x in zip(corrected, originals)) / lambda_c
                total = stat + constraint
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                sched.step(float(total.detach()))
            with torch.no_grad():
                final = detach_to(args, device)
                output = unit(*final, **kwargs)
        out.append(CacheEntry(entry.args, entry.kwargs, detach_to(output, device),
                              dict(entry.extras, fp_args=final)), key=keys.get(i), copy=False)
    cache.clear()
    return out
