"""Methods that only set quantization scales (no training): MinMax and MSE/Lp search."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ...quant import init_activation_quantizers, iter_quant_modules, set_quant_state
from .. import dist as calib_dist
from ...registry import PTQ_METHODS
from ..trace import ForwardFn
from .base import PTQMethod

_SEARCHES = ('mse', 'lp')


def _set_scale_method(model: nn.Module, method: str, p: float | None = None) -> None:
    """Set ``scale_method`` (and ``p``) of every quantizer that has one."""
    for _, layer in iter_quant_modules(model):
        quantizers = [*layer.weight_quantizers().values(), *layer.input_quantizers().values()]
        for q in quantizers:
            if q is not None and hasattr(q, 'scale_method'):
                q.scale_method = method
                if p is not None:
                    q.p = p


class _ScaleOnly(PTQMethod):
    """Re-initialises weight and activation scales with ``scale_method``; trains nothing."""

    trains = False
    adaround = False
    scale_method = 'minmax'
    p: float | None = None

    def __init__(self, **kwargs: Any) -> None:
        iters = kwargs.pop('iters', 0)
        if iters != 0:
            raise ValueError(f'{type(self).__name__} trains nothing: iters={iters!r} must be 0 '
                             'or left out')
        super().__init__(iters=0, **kwargs)

    def init_scales(self, model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn,
                    seed: int = 0) -> None:
        _set_scale_method(model, self.scale_method, self.p)
        for _, layer in iter_quant_modules(model):
            layer.init_weight_quantizers()
        set_quant_state(model, weight=True, input=True)
        init_activation_quantizers(model, lambda: [forward_fn(model, b) for b in batches],
                                   seed=seed, parallel=calib_dist.observer_sharing())


@PTQ_METHODS.register_module()
class MinMax(_ScaleOnly):
    """Min/max clipping ranges for weights (per channel) and activations (per tensor)."""


@PTQ_METHODS.register_module()
class MSE(_ScaleOnly):
    """Clipping ranges that minimise the ``L_p`` quantization error (p = 2: MSE).

    Args:
        p: exponent of the error; 2 uses the 'mse' search, other values the 'lp' search.
        **kwargs: see :class:`PTQMethod` (only logging options matter here).
    """

    def __init__(self, *, p: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not p > 0:
            raise ValueError(f'p={p} must be > 0')
        self.scale_method = 'mse' if p == 2.0 else 'lp'
        self.p = None if p == 2.0 else p
