"""AdaRound (Nagel et al. 2020): layer-wise learned rounding, activation steps frozen."""
from __future__ import annotations

from typing import Any, Sequence

from ...registry import PTQ_METHODS
from .base import PTQMethod


@PTQ_METHODS.register_module()
class AdaRound(PTQMethod):
    """Layer-wise AdaRound: output MSE + rounding regulariser, no drop, act steps frozen.

    Args:
        block_scopes: ``()``: every quantized layer is its own unit.
        learn_act: False: activation step sizes keep their initial values.
        **kwargs: see :class:`PTQMethod`.
    """

    def __init__(self, *, block_scopes: Sequence[str] = (), learn_act: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(block_scopes=block_scopes, learn_act=learn_act, **kwargs)
