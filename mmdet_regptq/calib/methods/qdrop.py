"""QDrop (Wei et al. 2022) and PD-Quant (Liu et al. 2023), which adds a prediction KL."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from ...registry import PTQ_METHODS
from ..capture import GradLoss
from ..losses import PredictionKL, ReconLoss
from ..units import ReconUnit
from .base import PTQMethod


@PTQ_METHODS.register_module()
class QDrop(PTQMethod):
    """Block-wise AdaRound with activation-quantization drop (0.5) and FP input mixing.

    Args:
        drop_prob: each input element of the unit's wrappers keeps its FP value with this
            probability during training; the unit's cached quantized inputs are mixed
            with its FP inputs with the same probability (``fp_input_prob``).
        **kwargs: see :class:`PTQMethod`.
    """

    def __init__(self, *, drop_prob: float = 0.5, **kwargs: Any) -> None:
        super().__init__(drop_prob=drop_prob, **kwargs)


@PTQ_METHODS.register_module()
class PDQuant(QDrop):
    """QDrop's settings plus ``KL(fp || q) * T^2`` on the final predictions.

    The final outputs come from a :class:`TailRunner` forward of the rest of the network
    (later units still FP). ``calibrate(output_fn=...)`` turns raw outputs into logits
    ``[N, C]``.

    Args:
        temperature: ``T`` (4).
        sigmoid: per-class binary KL (sigmoid detection heads).
        kl_weight: factor of the KL term.
        **kwargs: see :class:`QDrop`.
    """

    def __init__(self, *, temperature: float = 4.0, sigmoid: bool = False,
                 kl_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature
        self.sigmoid = sigmoid
        self.kl_weight = kl_weight

    def losses(self, unit: ReconUnit, *, output_fn: Callable[[Any], Tensor] | None,
               global_loss: GradLoss | None) -> list[ReconLoss]:
        return super().losses(unit, output_fn=output_fn, global_loss=global_loss) + [
            PredictionKL(output_fn=output_fn, temperature=self.temperature,
                         sigmoid=self.sigmoid, weight=self.kl_weight)]
