"""Loss terms of the reconstruction loop (registered in ``RECON_LOSSES``).

Each term is a small object called with a :class:`ReconContext`; the loop sums the terms.
Class attributes tell the loop what a term needs: ``needs_final_outputs`` (a tail forward
through :class:`TailRunner`), ``needs_fisher`` (cached output gradients), and
``is_regularizer`` (left out of the before/after reconstruction error).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import RECON_LOSSES
from . import dist as calib_dist
from .units import ReconUnit

_REDUCTIONS = ('channel_sum', 'mean')


@dataclass
class ReconContext:
    """What a loss term sees at one iteration.

    Attributes:
        unit: the unit being reconstructed.
        pred: the unit's output tensors (quantized unit; all calls of the drawn entry or
            batch, float tensors flattened in a fixed order), e.g. ``[N, C, H, W]`` each.
        target: the full-precision targets, matching ``pred`` one to one.
        fisher: ``dL/dO`` matching ``pred``, or ``None`` if not captured.
        quantizers: the unit's rounding quantizers (with ``regularizer(beta)``).
        iteration: 0-based iteration.
        total_iters: iterations of this reconstruction.
        final_pred: the quantized model's final outputs (tail forward), or ``None``.
        final_target: the full-precision model's final outputs, or ``None``.
        target_key: identifies ``final_target`` within one reconstruction (the calibration
            batch it belongs to), so a term may reuse what it derived from it; ``None``:
            no reuse.
        decode_target: ``decode_target(loss_fn)`` returns
            ``loss_fn.decode_target(final_target)``, memoised for the whole calibration
            (the FP outputs do not change between units); ``None``: not available.
    """

    unit: ReconUnit
    pred: list[Tensor]
    target: list[Tensor]
    fisher: list[Tensor] | None
    quantizers: list[nn.Module]
    iteration: int
    total_iters: int
    final_pred: Any = None
    final_target: Any = None
    target_key: Any = None
    decode_target: Callable[[Any], Any] | None = None

    def zero(self) -> Tensor:
        """A scalar zero on the prediction's device."""
        return self.pred[0].new_zeros(()) if self.pred else torch.zeros(())


class ReconLoss:
    """Base of the loss terms: ``__call__(ctx) -> scalar Tensor``."""

    needs_final_outputs: ClassVar[bool] = False
    #: with ``needs_final_outputs``: the final outputs come from the unit's unmixed
    #: quantized input (a separate tail forward when the loop mixes FP inputs in)
    final_from_quant_input: ClassVar[bool] = False
    needs_fisher: ClassVar[bool] = False
    is_regularizer: ClassVar[bool] = False

    def __call__(self, ctx: ReconContext) -> Tensor:
        raise NotImplementedError

    def summary(self) -> str:
        """A line for the unit's log after its reconstruction (``''``: nothing)."""
        return ''

    @property
    def name(self) -> str:
        return type(self).__name__


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction={reduction!r} is unknown; allowed: {list(_REDUCTIONS)}')
    return reduction


def reduce_errors(errors: Sequence[Tensor], reduction: str) -> Tensor:
    """Normalise summed element errors over several tensors.

    Args:
        errors: element-wise errors, e.g. ``[N, C, H, W]`` each.
        reduction: ``'channel_sum'`` = summed over dim 1 (channels) and averaged over the
            other positions (QDrop/BRECQ's ``lp_loss``); ``'mean'`` = averaged over all.

    Returns:
        A scalar.
    """
    total = sum(e.sum() for e in errors)
    if reduction == 'mean':
        count = sum(e.numel() for e in errors)
    else:
        count = sum(e.numel() // (e.shape[1] if e.dim() > 1 else 1) for e in errors)
    return total / max(count, 1)


@RECON_LOSSES.register_module()
class OutputMSE(ReconLoss):
    """``|pred - target|^p`` of the unit output (p = 2: MSE).

    Args:
        p: exponent.
        reduction: see :func:`reduce_errors`.
        weight: factor of the term.
    """

    def __init__(self, *, p: float = 2.0, reduction: str = 'channel_sum',
                 weight: float = 1.0) -> None:
        self.p = p
        self.reduction = _check_reduction(reduction)
        self.weight = weight

    def __call__(self, ctx: ReconContext) -> Tensor:
        errors = [(p - t).abs().pow(self.p) for p, t in zip(ctx.pred, ctx.target)]
        return self.weight * reduce_errors(errors, self.reduction)


@RECON_LOSSES.register_module()
class FisherMSE(ReconLoss):
    """Diagonal-Fisher weighted error ``(pred - target)^2 * g^2`` (BRECQ, Reg-PTQ's L_H).

    The weights ``g^2`` are divided by their mean over the drawn entry, so the term has
    the scale of :class:`OutputMSE` and balances with the rounding regulariser whatever
    the magnitude of the gradients (our choice; BRECQ uses ``(|g| + 1)^2``). An entry
    whose gradients are all zero (the loss does not depend on this unit, e.g. Mask
    R-CNN's mask head under Reg-PTQ's box/score loss) is weighted uniformly: the term is
    then :class:`OutputMSE`, instead of zero (which would leave the unit untrained).
    Under data-parallel calibration the mean (and the all-zero test) is over the entries
    that all ranks drew at this iteration, as one process drawing their whole batch.

    Args:
        reduction: see :func:`reduce_errors`.
        weight: factor of the term.
        eps: floor of the normaliser.
    """

    needs_fisher = True

    def __init__(self, *, reduction: str = 'channel_sum', weight: float = 1.0,
                 eps: float = 1e-20) -> None:
        self.reduction = _check_reduction(reduction)
        self.weight = weight
        self.eps = eps

    def __call__(self, ctx: ReconContext) -> Tensor:
        if ctx.fisher is None:
            raise ValueError(f'FisherMSE: no output gradients were captured for unit '
                             f'{ctx.unit.name!r} (capture with grad_loss)')
        sq = [g.pow(2) for g in ctx.fisher]
        total = sum(s.sum() for s in sq)
        count = sum(s.numel() for s in sq)
        shared = calib_dist.is_active()
        if shared:   # data-parallel: the mean over the batch that the ranks drew together
            total, count = calib_dist.all_reduce_sum(torch.stack([
                torch.as_tensor(total, dtype=torch.float32),
                torch.as_tensor(float(count))]).to(ctx.pred[0].device)).unbind()
        if not float(total) > 0:
            sq = [torch.ones_like(s) for s in sq]
            total = count if shared else sum(s.sum() for s in sq)
        norm = torch.clamp(total / max(count, 1), min=self.eps)
        errors = [(p - t).pow(2) * (s / norm) for p, t, s in zip(ctx.pred, ctx.target, sq)]
        return self.weight * reduce_errors(errors, self.reduction)


class LinearTempDecay:
    """AdaRound's temperature ``beta``: constant during the warm-up, then linear decay.

    Args:
        t_max: total iterations.
        warmup: share of ``t_max`` before the decay starts.
        start_b: beta during the warm-up.
        end_b: beta at ``t_max``.
    """

    def __init__(self, *, t_max: int, warmup: float = 0.2, start_b: float = 20.0,
                 end_b: float = 2.0) -> None:
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f'warmup={warmup} must be in [0, 1)')
        self.t_max = t_max
        self.start_decay = warmup * t_max
        self.start_b = start_b
        self.end_b = end_b

    def __call__(self, t: int) -> float:
        if t < self.start_decay:
            return self.start_b
        rel = (t - self.start_decay) / max(self.t_max - self.start_decay, 1e-12)
        return self.end_b + (self.start_b - self.end_b) * max(0.0, 1.0 - rel)


@RECON_LOSSES.register_module()
class RoundingRegularizer(ReconLoss):
    """``weight * sum_q q.regularizer(beta)``: drives AdaRound's ``h(alpha)`` to 0 or 1.

    Zero during the warm-up; then ``beta`` follows ``schedule`` (default
    :class:`LinearTempDecay` over the run's iterations, from ``beta[0]`` to ``beta[1]``).

    Args:
        weight: factor of the term (AdaRound/QDrop: 0.01).
        warmup: share of the iterations without the term.
        beta: ``(start, end)`` of the default schedule.
        schedule: explicit ``schedule(iteration) -> beta``.
    """

    is_regularizer = True

    def __init__(self, *, weight: float = 0.01, warmup: float = 0.2,
                 beta: tuple[float, float] = (20.0, 2.0),
                 schedule: Callable[[int], float] | None = None) -> None:
        self.weight = weight
        self.warmup = warmup
        self.beta = tuple(beta)
        self.schedule = schedule

    def temperature(self, ctx: ReconContext) -> float:
        schedule = self.schedule or LinearTempDecay(
            t_max=ctx.total_iters, warmup=self.warmup, start_b=self.beta[0],
            end_b=self.beta[1])
        return schedule(ctx.iteration)

    def __call__(self, ctx: ReconContext) -> Tensor:
        if ctx.iteration < self.warmup * ctx.total_iters or not ctx.quantizers:
            return ctx.zero()
        beta = self.temperature(ctx)
        return self.weight * sum(q.regularizer(beta) for q in ctx.quantizers)


@RECON_LOSSES.register_module()
class PredictionKL(ReconLoss):
    """PD-Quant's prediction difference: ``weight * KL(p_fp || p_q)`` on the final outputs.

    As PD-Quant's official code: ``KLDivLoss(reduction='batchmean')`` of
    ``log_softmax(q / T)`` against ``softmax(fp / T)`` (no ``T^2`` factor), averaged over
    the rows; PD-Quant weights it by ``1 / lambda_r`` (``weight``). The final outputs are
    those of the unit's purely quantized input (:attr:`final_from_quant_input`): PD-Quant
    runs the prediction pass on the cached quantized input, the reconstruction pass on the
    QDrop-mixed one.

    Args:
        output_fn: ``output_fn(raw_outputs) -> logits [N, C]``; ``None`` = the raw
            outputs are already that tensor.
        temperature: ``T`` (PD-Quant: 4).
        sigmoid: per-class binary KL of ``sigmoid(x / T)``, summed over the classes
            (detection heads with independent sigmoid scores), instead of the softmax KL
            over ``C``.
        weight: factor of the term (PD-Quant: ``1 / lambda_r``).
    """

    needs_final_outputs = True
    #: the tail forward of this term reads the unit's unmixed quantized input
    final_from_quant_input: ClassVar[bool] = True

    def __init__(self, *, output_fn: Callable[[Any], Tensor] | None = None,
                 temperature: float = 4.0, sigmoid: bool = False, weight: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f'temperature={temperature} must be > 0')
        self.output_fn = output_fn
        self.temperature = temperature
        self.sigmoid = sigmoid
        self.weight = weight

    def _logits(self, outputs: Any) -> Tensor:
        logits = self.output_fn(outputs) if self.output_fn is not None else outputs
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError('PredictionKL: output_fn must return logits [N, C], got '
                             f'{getattr(logits, "shape", type(logits).__name__)}')
        return logits

    def __call__(self, ctx: ReconContext) -> Tensor:
        if ctx.final_pred is None or ctx.final_target is None:
            raise ValueError('PredictionKL needs the final outputs (a TailRunner forward)')
        t = self.temperature
        q = self._logits(ctx.final_pred) / t
        fp = self._logits(ctx.final_target).detach() / t
        if self.sigmoid:
            lp, lpn = F.logsigmoid(fp), F.logsigmoid(-fp)
            lq, lqn = F.logsigmoid(q), F.logsigmoid(-q)
            p = lp.exp()
            kl = (p * (lp - lq) + (1 - p) * (lpn - lqn)).sum(-1).mean()
        else:
            kl = F.kl_div(F.log_softmax(q, -1), F.log_softmax(fp, -1), log_target=True,
                          reduction='batchmean')
        return self.weight * kl
