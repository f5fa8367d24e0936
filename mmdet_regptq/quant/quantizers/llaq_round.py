"""LLAQ with AdaRound-style learned rounding between neighbouring log levels ('LLAQRound').

LLAQ (:mod:`.llaq`) learns the *grid* (four ``k`` / ``a`` per channel) but rounds every
weight to the nearest level of ``psi`` with a straight-through estimator: a weight cannot
choose the other neighbour when that serves the layer's output better. AdaRound's
per-weight choice is where the uniform baselines gain most at 4 bits (QDrop), so this
quantizer adds it to the log grid. Each weight keeps its side ``s`` and a *base level*
``l`` (the highest level whose magnitude is at most ``|w - mu|``, fixed at
:meth:`LLAQRoundQuantizer.init_from`); during reconstruction its magnitude is the
interpolation

    m = (1 - h) * m_s(l) + h * m_s(min(l + 1, L_s)),    m_s(0) = 0,

with ``h`` AdaRound's rectified sigmoid of a per-weight ``alpha`` (initialised so that
``m = |w - mu|``) and ``m_s(level) = S_s * 2^((level - L_s) * r_s)`` of the current, still
learned ``k`` / ``a``. Hard rounding (``soft_targets=False``, the default outside a
reconstruction loop) is the level ``l + 1[alpha >= 0]``: nearest in value at init, and the
same integer codes, integer form and shift form as LLAQ (``to_int`` / ``from_int`` exact).

An extension of the paper (which rounds ``psi`` straight-through): ``RegPTQ`` uses it on
2-bit LLAQ layers by default (``llaq_rounding='auto'``; ``'learned'``: every LLAQ layer).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...registry import QUANTIZERS
from .llaq import LLAQuantizer
from .rounding import HARD_ALPHA, LearnedRounding

__all__ = ['LLAQRoundQuantizer']


@QUANTIZERS.register_module(name='LLAQRound')
class LLAQRoundQuantizer(LearnedRounding, LLAQuantizer):
    """LLAQ grid + learned per-weight rounding (module docstring).

    The rounding state (``sign``, ``base_level``, ``alpha``: the weight's shape) belongs to
    the weight given to :meth:`init_from`; :meth:`forward` checks the shape.

    Args:
        zeta: upper stretch of the rectified sigmoid (AdaRound: 1.1).
        gamma: lower stretch (AdaRound: -0.1).
        **kwargs: see :class:`LLAQuantizer`.
    """

    _lazy_shapes = LLAQuantizer._lazy_shapes + ('sign', 'base_level', 'alpha')

    def __init__(self, bits: int, *, zeta: float = 1.1, gamma: float = -0.1,
                 **kwargs) -> None:
        super().__init__(bits, **kwargs)
        self.zeta = zeta
        self.gamma = gamma
        # int8 codes: the rounding state costs a quarter of the float weight each
        self.register_buffer('sign', torch.zeros((), dtype=torch.int8))
        self.register_buffer('base_level', torch.zeros((), dtype=torch.int8))
        self.alpha = nn.Parameter(torch.zeros(()))
        self.soft_targets = False
        self.hardened = False

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """LLAQ's grid search, then the base levels and ``alpha`` of the weight ``x``."""
        super().init_from(x)
        x = x.detach().to(self.mu.dtype)
        d = x - self.mu
        sign = torch.sign(d)
        pos = sign > 0
        top = torch.where(pos, float(self.top[0]), float(self.top[1]))
        scale, step = self._scale_step()
        mag = d.abs()
        # m(level) = S * 2^((level - L) * r) <= |d|  <=>  level <= L + log2(|d| / S) / r
        s = torch.where(pos, scale[0], scale[1])
        r = torch.where(pos, step[0], step[1])
        below = torch.floor(top + torch.log2(mag.clamp(min=1e-30) / s) / r)
        base = torch.where(mag > 0, below.clamp(0, None), torch.zeros_like(mag))
        base = torch.minimum(base, top)
        lower = self._magnitude(base, s, r, top)
        upper = self._magnitude(torch.minimum(base + 1, top), s, r, top)
        gap = upper - lower
        frac = torch.where(gap > 0, (mag - lower) / gap.clamp(min=1e-30),
                           torch.zeros_like(mag)).clamp(0, 1)
        # frac 0 maps to alpha = -inf: AdaRound's init keeps it finite on the same clamp
        frac = frac.clamp(1e-4, 1 - 1e-4)
        alpha = self.alpha_for_fraction(frac)
        alpha = torch.where(base >= top, torch.full_like(alpha, -HARD_ALPHA), alpha)
        self.sign = sign.to(torch.int8)
        self.base_level = base.to(torch.int8)
        self.alpha = nn.Parameter(alpha.to(x.dtype), requires_grad=True)
        self.soft_targets = False
        self.hardened = False

    @staticmethod
    def _magnitude(level: Tensor, s: Tensor, r: Tensor, top: Tensor) -> Tensor:
        return torch.where(level > 0, s * torch.exp2((level - top) * r), torch.zeros_like(s))

    # ------------------------------------------------------------------ rounding
    def _check_shape(self, x: Tensor) -> None:
        if x.shape != self.alpha.shape:
            raise ValueError(f'{self.describe()}: input shape {tuple(x.shape)} != the shape '
                             f'of the weight it was initialised from {tuple(self.alpha.shape)}')

    def _codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Float ``sign`` and hard ``level = base + 1[alpha >= 0]`` (clamped to ``L_s``)."""
        self._check_shape(x)
        sign, base = self.sign.to(x.dtype), self.base_level.to(x.dtype)
        top = torch.where(sign > 0, float(self.top[0]), float(self.top[1]))
        level = torch.minimum(base + (self.alpha >= 0).to(x.dtype), top)
        return sign, torch.where(sign == 0, torch.zeros_like(level), level)

    def _fake_quant(self, x: Tensor) -> Tensor:
        if not self.soft_targets:
            return super()._fake_quant(x)
        self._check_shape(x)
        scale, step = self._scale_step()
        sign, base = self.sign.to(x.dtype), self.base_level.to(x.dtype)
        pos = sign > 0
        top = torch.where(pos, float(self.top[0]), float(self.top[1]))
        s = torch.where(pos, scale[0], scale[1])
        r = torch.where(pos, step[0], step[1])
        lower = self._magnitude(base, s, r, top)
        upper = self._magnitude(torch.minimum(base + 1, top), s, r, top)
        h = self.rectified_sigmoid()
        return self.mu + sign * (lower + h * (upper - lower))

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, soft_targets={self.soft_targets}, '
                f'zeta={self.zeta}, gamma={self.gamma}')

