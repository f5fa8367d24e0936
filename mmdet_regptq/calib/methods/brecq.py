"""BRECQ (Li et al. 2021): block-wise AdaRound, output MSE or Fisher-weighted loss."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from ...registry import PTQ_METHODS
from ..capture import GradLoss
from ..losses import FisherMSE, OutputMSE, ReconLoss
from ..units import ReconUnit
from .base import PTQMethod


@PTQ_METHODS.register_module()
class BRECQ(PTQMethod):
    """Block reconstruction with AdaRound and LSQ activation steps; no drop.

    Args:
        fisher: replace the output MSE by the diagonal-Fisher weighted loss, with
            gradients of ``calibrate(global_loss=...)`` (default: MSE of the final
            outputs) w.r.t. each block output.
        **kwargs: see :class:`PTQMethod`.
    """

    def __init__(self, *, fisher: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fisher = fisher

    def needs_fisher(self) -> bool:
        return self.fisher

    def losses(self, unit: ReconUnit, *, output_fn: Callable[[Any], Tensor] | None,
               global_loss: GradLoss | None) -> list[ReconLoss]:
        terms = super().losses(unit, output_fn=output_fn, global_loss=global_loss)
        if self.fisher:
            terms = [FisherMSE() if isinstance(t, OutputMSE) else t for t in terms]
        return terms
