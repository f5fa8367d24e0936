"""QDrop (Wei et al. 2022): block reconstruction with activation-quantization drop."""
from __future__ import annotations

from typing import Any

from ...registry import PTQ_METHODS
from .base import PTQMethod


@PTQ_METHODS.register_module()
class QDrop(PTQMethod):
    """Block-wise AdaRound with QDrop's drop probability 0.5, as its official code.

    Each element of a unit's input is either its quantized value or its full-precision
    one, decided once (``fp_input_prob``, :class:`~..reconstruct.InputMixer`); the layers
    inside a block drop their own quantized inputs with ``drop_prob``. Layer units end
    after the activation that follows the layer (QDrop's ``conv -> act`` unit).

    Args:
        drop_prob: inside a block, each input element of a layer keeps its FP value with
            this probability during training; the unit's input takes its FP value with
            the same probability (``fp_input_prob``).
        **kwargs: see :class:`PTQMethod`.
    """

    def __init__(self, *, drop_prob: float = 0.5, **kwargs: Any) -> None:
        super().__init__(drop_prob=drop_prob, **kwargs)
