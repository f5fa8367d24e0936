"""Learned per-weight rounding shared by 'AdaRound' (uniform grid) and 'LLAQRound' (log grid).

Both quantizers choose, per weight, between the two neighbouring grid levels with
AdaRound's rectified sigmoid ``h(alpha)`` (Nagel et al. 2020); only the grid differs. The
pieces that do not depend on the grid live here so the two stay the same by construction.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ['HARD_ALPHA', 'LearnedRounding']

HARD_ALPHA = 10.0  # |alpha| after harden(): the rectified sigmoid is exactly 0 or 1 there


class LearnedRounding:
    """Mixin for quantizers with a per-weight ``alpha`` and stretches ``zeta`` / ``gamma``.

    The host class owns ``self.alpha`` (``nn.Parameter``), ``self.zeta``, ``self.gamma``,
    ``self.soft_targets`` and ``self.hardened``.
    """

    alpha: nn.Parameter
    zeta: float
    gamma: float
    soft_targets: bool
    hardened: bool

    def alpha_for_fraction(self, frac: Tensor) -> Tensor:
        """``alpha`` with ``h(alpha) = frac``: the soft weight starts at the float weight."""
        return -torch.log((self.zeta - self.gamma) / (frac - self.gamma) - 1)

    def rectified_sigmoid(self) -> Tensor:
        """``h = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``, ``alpha``'s shape."""
        return torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma,
                           0, 1)

    def regularizer(self, beta: float) -> Tensor:
        """``sum(1 - |2 h(alpha) - 1|^beta)``: pushes ``h`` towards 0 or 1 (scalar)."""
        return (1 - (2 * self.rectified_sigmoid() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self) -> None:
        """Fix the rounding for good: ``alpha`` = ±``HARD_ALPHA`` and frozen, hard levels."""
        self.alpha.data = torch.where(self.alpha >= 0, HARD_ALPHA, -HARD_ALPHA).to(
            self.alpha.dtype)
        self.alpha.requires_grad_(False)
        self.soft_targets = False
        self.hardened = True
