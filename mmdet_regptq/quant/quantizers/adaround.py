"""AdaRound learnable rounding of weights (Nagel et al. 2020), registered as 'AdaRound'."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...registry import QUANTIZERS
from .base import Quantizer
from .functional import fake_quant_export, normalize_axis
from .rounding import LearnedRounding
from .uniform import UniformQuantizer

__all__ = ['AdaRoundQuantizer']


@QUANTIZERS.register_module(name='AdaRound')
class AdaRoundQuantizer(LearnedRounding, Quantizer):
    """``w -> s * (clamp(floor(w / s) + h(alpha) + z, qmin, qmax) - z)``.

    ``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)`` (rectified sigmoid)
    while ``soft_targets`` is True; ``h = 1[alpha >= 0]`` otherwise. The scale and zero point
    are copied from ``base`` and frozen (buffers). ``alpha`` (``weight``'s shape) starts at
    ``-log((zeta - gamma) / (frac - gamma) - 1)`` with ``frac = w / s - floor(w / s)``, so
    the soft weight starts at the float weight (inside the clipping range) and the hard
    weight at the nearest grid point.

    Args:
        base: an initialised :class:`UniformQuantizer` (its grid and parameters are reused).
        weight: the float weight ``[C_out, ...]`` this quantizer rounds.
        zeta: upper stretch of the rectified sigmoid.
        gamma: lower stretch of the rectified sigmoid.
    """

    _lazy_shapes = ('scale', 'zero_point')

    def __init__(self, base: UniformQuantizer, weight: Tensor, *, zeta: float = 1.1,
                 gamma: float = -0.1) -> None:
        if not isinstance(base, UniformQuantizer):
            raise TypeError(f'AdaRoundQuantizer needs a UniformQuantizer base, got '
                            f'{type(base).__name__}')
        if not base.is_initialized():
            raise ValueError(f'AdaRoundQuantizer: base {base.describe()} is not initialised')
        super().__init__(base.bits, name=base.name)
        self.zeta = zeta
        self.gamma = gamma
        self.symmetric = base.symmetric
        self.per_channel = base.per_channel
        self.ch_axis = base.ch_axis
        self._quant_range = base.quant_range
        self.register_buffer('scale', base.scale.detach().clone())
        self.register_buffer('zero_point', base.zero_point.detach().clone())
        self.alpha = nn.Parameter(torch.zeros_like(weight.detach()))
        self.soft_targets = True
        self.hardened = False
        self.init_from(weight)

    @property
    def quant_range(self) -> tuple[int, int]:
        return self._quant_range

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """Set ``alpha`` so that the soft rounding reproduces ``x`` (the weight)."""
        if x.shape != self.alpha.shape:
            raise ValueError(f'{self.describe()}: weight shape {tuple(x.shape)} != alpha shape '
                             f'{tuple(self.alpha.shape)}')
        scaled = x.detach() / self.scale
        frac = scaled - torch.floor(scaled)
        self.alpha.data = self.alpha_for_fraction(frac).to(self.alpha.dtype)
        self._mark_initialized()

    def rounding(self) -> Tensor:
        """Current rounding offset: soft ``h(alpha)`` or hard ``1[alpha >= 0]``."""
        if self.soft_targets:
            return self.rectified_sigmoid()
        return (self.alpha >= 0).to(self.alpha.dtype)

    def _fake_quant(self, x: Tensor) -> Tensor:
        if x.shape != self.alpha.shape:
            raise ValueError(f'{self.describe()}: input shape {tuple(x.shape)} != weight shape '
                             f'{tuple(self.alpha.shape)}')
        qmin, qmax = self.quant_range
        q = torch.clamp(torch.floor(x / self.scale) + self.rounding() + self.zero_point,
                        qmin, qmax)
        return (q - self.zero_point) * self.scale

    def quant_params(self) -> dict[str, Tensor]:
        """``{'scale', 'zero_point'}`` of the frozen grid (broadcast shapes)."""
        return {'scale': self.scale, 'zero_point': self.zero_point}

    def to_int(self, x: Tensor) -> Tensor:
        """Integer codes ``clamp(floor(w / s) + 1[alpha >= 0] + z)`` (``int32``)."""
        self._check_initialized()
        qmin, qmax = self.quant_range
        hard = (self.alpha >= 0).to(x.dtype)
        q = torch.clamp(torch.floor(x / self.scale) + hard + self.zero_point, qmin, qmax)
        return q.to(torch.int32)

    def fake_quant_export(self, x: Tensor) -> Tensor:
        """Hard-rounded weight passed through the exportable fake-quantize op."""
        if not self.enabled:
            return x
        self._check_initialized()
        axis = normalize_axis(self.ch_axis, x.dim()) if self.per_channel else None
        dequant = (self.to_int(x).to(x.dtype) - self.zero_point) * self.scale
        return fake_quant_export(dequant, self.scale, self.zero_point, *self.quant_range, axis)

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, soft_targets={self.soft_targets}, '
                f'zeta={self.zeta}, gamma={self.gamma}')
