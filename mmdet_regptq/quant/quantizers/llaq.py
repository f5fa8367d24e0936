"""LLAQ: Reg-PTQ's learnable logarithmic-affine weight quantizer (registered as 'LLAQ').

Regression-head weights are Laplace-like: concentrated around a centre with long tails. LLAQ
splits each channel at its centre ``mu`` and maps the distance to it to a log scale,

    d = w - mu,   psi(d) = k_s * log2(|d|) + a_s,   s = sign(d) in {+, -},

with its own ``(k_s, a_s)`` on each side (four learnable parameters per channel, or per
quantizer with ``per_channel=False``), then quantizes ``psi`` uniformly to the integer levels
``1..L_s`` (straight-through rounding). The sign is kept separately and level 0 is an
explicit zero level (``w_q = mu``). ``k`` sets the density of the log grid (the ratio of two
neighbouring magnitudes is ``2^(1/k)``), ``a`` its position.

Codes: a ``b``-bit weight is ``c = sign * level`` in the signed range
``[-2^(b-1), 2^(b-1) - 1]`` (two's complement): the negative side has ``L_- = 2^(b-1)``
levels, the positive side ``L_+ = 2^(b-1) - 1``, and ``c = 0`` is ``mu``: all ``2^b`` codes
are used, zero is exact.

Dequantization (the ONE formula used by ``forward`` and :meth:`LLAQuantizer.from_int`, so
the integer form reproduces the fake-quantized weight bit for bit):

    w_q = mu + sign * S_s * 2^((level - L_s) * r_s)    (level >= 1),   w_q = mu (level 0)

with ``S_s = 2^((L_s - a_s) / k_s)`` the magnitude of the top level and ``r_s = 1 / k_s``.
The exponent ``(level - L_s) * r_s`` is ``<= 0``: an integer kernel computes ``X^T W`` as
``S_s * (X >> ((L_s - level) / k_s))`` - an exact right shift when ``k_s = 1`` (the initial
value), and a shift plus one of ``k``'s fractional multipliers otherwise; the dequantized
value is exactly ``S_s`` times a power of two whenever ``r_s * (L_s - level)`` is an integer.

Initialisation (explicit, :meth:`LLAQuantizer.init_from`; the project's choice, the paper
gives none): ``mu`` = per-channel median (a buffer, not learned); ``k`` from
``k_candidates`` (default ``(1.0,)``: ``k = 1``); ``a`` by a grid search on the
reconstruction error ``mean |w - w_q|^search_p`` per channel and side, over top-level
magnitudes ``max|d| * 2^-t`` with ``t`` in ``search_octaves``. Measured on Laplace weights:
``k = 1`` beats the best uniform quantizer at 2 and 3 bits but not at 4 (its grid spans
``2^7``); ``k_candidates=SEARCH_K`` beats it at 2, 3 and 4 bits.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ...registry import QUANTIZERS
from .base import Quantizer
from .functional import (channel_shape, normalize_axis, round_ste, subsample_columns,
                         to_channel_rows)

__all__ = ['LLAQuantizer', 'LLAQCodes', 'LLAQShiftForm', 'SEARCH_K', 'llaq_dequant']

#: A wider set of ``k`` for the initial search (``k_candidates=SEARCH_K``).
SEARCH_K = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)

_TINY = 1e-30
_SEARCH_CHUNK_ELEMENTS = 1 << 23


class LLAQCodes(NamedTuple):
    """Integer form of an LLAQ weight (``P`` = the parameter shape, e.g. ``[C, 1, 1, 1]``).

    Attributes:
        sign: ``int8`` of the weight's shape: -1, 0 (the centre ``mu``) or +1.
        level: ``int32`` of the weight's shape: 0 (zero level) or ``1..L_s``.
        scale: ``[2, *P]`` magnitude of the top level ``S_s`` of the (+, -) sides.
        step: ``[2, *P]`` exponent step ``r_s = 1 / k_s`` of the (+, -) sides.
        mu: ``P`` centre of each channel.
        top: ``(L_+, L_-)`` levels per side.
    """

    sign: Tensor
    level: Tensor
    scale: Tensor
    step: Tensor
    mu: Tensor
    top: tuple[int, int]


class LLAQShiftForm(NamedTuple):
    """LLAQ weight as two int8 power-of-two tensors (:meth:`LLAQuantizer.shift_form`).

    Attributes:
        pos: ``int8`` of the weight's shape: ``1 << e`` where the code is positive, else 0.
        neg: ``int8``: ``-(1 << e)`` where the code is negative, else 0.
        scale_pos: ``[C]`` float scale of ``pos`` per output channel.
        scale_neg: ``[C]`` float scale of ``neg``.
        mu: ``[C]`` centre per output channel.
    """

    pos: Tensor
    neg: Tensor
    scale_pos: Tensor
    scale_neg: Tensor
    mu: Tensor

    def dequantize(self) -> Tensor:
        """``(pos * s_+ + neg * s_-) + mu`` in float32, in the exported graph's order."""
        shape = [-1] + [1] * (self.pos.dim() - 1)
        return ((self.pos.float() * self.scale_pos.reshape(shape)
                 + self.neg.float() * self.scale_neg.reshape(shape)) + self.mu.reshape(shape))


def llaq_dequant(sign: Tensor, level: Tensor, mu: Tensor, scale: Tensor, step: Tensor,
                 top: tuple[int, int]) -> Tensor:
    """``mu + sign * S_s * 2^((level - L_s) * r_s)`` (0 offset at level 0).

    Args:
        sign: float ``-1/0/+1``, the weight's shape.
        level: float integer levels ``0..L_s``, the weight's shape.
        mu: centre, broadcastable to the weight.
        scale: ``[2, *P]`` top-level magnitude per side (+, -).
        step: ``[2, *P]`` ``1 / k`` per side (+, -).
        top: ``(L_+, L_-)``.

    Returns:
        The dequantized weight (differentiable w.r.t. every tensor argument).
    """
    pos = sign > 0
    s = torch.where(pos, scale[0], scale[1])
    r = torch.where(pos, step[0], step[1])
    top_level = torch.where(pos, float(top[0]), float(top[1]))
    mag = s * torch.exp2((level - top_level) * r)
    return mu + sign * torch.where(level > 0, mag, torch.zeros_like(mag))


@QUANTIZERS.register_module(name='LLAQ')
class LLAQuantizer(Quantizer):
    """Learnable logarithmic-affine weight quantizer (see the module docstring).

    Parameters (``P`` = ``[C_out, 1, ...]`` per channel, ``[]`` per tensor): ``k_pos``,
    ``a_pos``, ``k_neg``, ``a_neg`` (``nn.Parameter``, trained by FGIC); buffer ``mu``.

    Args:
        bits: 2..8 (weights).
        per_channel: one ``(mu, k+, a+, k-, a-)`` per slice along ``ch_axis``; else one
            set for the whole tensor.
        ch_axis: channel axis of the weight (0: output channels).
        learnable: ``k`` and ``a`` require grad.
        k_candidates: values of ``k`` tried by the initial search (default ``(1.0,)``:
            the paper-derived init ``k = 1``; :data:`SEARCH_K` for a wider search).
        search_octaves: ``(lo, hi)`` range of ``t`` in octaves, the top level being
            ``max|d| * 2^-t`` (``t > 0`` clips the tail).
        num_candidates: grid points of ``t``.
        search_p: exponent of the reconstruction error minimised by the search.
        min_k: lower bound applied to ``k`` in the forward (keeps ``1 / k`` finite).
        power_of_two: keep ``k = 1`` on both sides (not searched, not learned; ``a`` is
            still searched and learned), so every level is ``S_s`` times a power of two and
            the layer deploys as integer shifts (:meth:`shift_form`); the paper's integer
            kernel ``X^T W = s_w * (X^T << round(psi(W)))`` assumes this grid.
        max_search_elements: larger weights are deterministically subsampled for the search
            (``mu`` and the maxima use all of the data).
        name: module name used in messages.
    """

    _lazy_shapes = ('mu', 'k_pos', 'a_pos', 'k_neg', 'a_neg')

    def __init__(self, bits: int, *, per_channel: bool = True, ch_axis: int = 0,
                 learnable: bool = True, k_candidates: Sequence[float] = (1.0,),
                 search_octaves: tuple[float, float] = (-0.5, 8.0), num_candidates: int = 100,
                 search_p: float = 2.0, min_k: float = 0.05, power_of_two: bool = False,
                 max_search_elements: int = 1 << 20, name: str = '') -> None:
        super().__init__(bits, name=name)
        if bits > 8:
            raise ValueError(f'bits={bits} is out of range for LLAQ (weights); allowed 2..8')
        k_candidates = (1.0,) if power_of_two else tuple(float(k) for k in k_candidates)
        if not k_candidates or min(k_candidates) <= 0:
            raise ValueError(f'k_candidates={k_candidates!r} must be non-empty and > 0')
        if len(search_octaves) != 2 or search_octaves[0] >= search_octaves[1]:
            raise ValueError(f'search_octaves={search_octaves!r} must be (lo, hi), lo < hi')
        if num_candidates < 1 or not search_p > 0 or not min_k > 0:
            raise ValueError(f'num_candidates={num_candidates} must be >= 1, '
                             f'search_p={search_p} and min_k={min_k} > 0')
        self.per_channel = per_channel
        self.ch_axis = ch_axis
        self.learnable = learnable
        self.k_candidates = k_candidates
        self.search_octaves = (float(search_octaves[0]), float(search_octaves[1]))
        self.num_candidates = num_candidates
        self.search_p = search_p
        self.min_k = min_k
        self.power_of_two = power_of_two
        self.max_search_elements = max_search_elements
        self.register_buffer('mu', torch.zeros(()))
        for side in ('pos', 'neg'):
            self.register_parameter(f'k_{side}', nn.Parameter(
                torch.ones(()), requires_grad=learnable and not power_of_two))
            self.register_parameter(f'a_{side}', nn.Parameter(torch.zeros(()),
                                                              requires_grad=learnable))

    # ------------------------------------------------------------------ grid
    @property
    def quant_range(self) -> tuple[int, int]:
        """Signed codes ``sign * level``: ``(-L_-, L_+) = (-2^(b-1), 2^(b-1) - 1)``."""
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    @property
    def top(self) -> tuple[int, int]:
        """Levels per side ``(L_+, L_-)``."""
        qmin, qmax = self.quant_range
        return qmax, -qmin

    def _axis(self, ndim: int) -> int | None:
        return normalize_axis(self.ch_axis, ndim) if self.per_channel else None

    def _k(self) -> tuple[Tensor, Tensor]:
        return self.k_pos.clamp(min=self.min_k), self.k_neg.clamp(min=self.min_k)

    def _scale_step(self) -> tuple[Tensor, Tensor]:
        """``S = 2^((L - a) / k)`` and ``r = 1 / k``, each ``[2, *P]`` (+, -)."""
        (k_pos, k_neg), (top_pos, top_neg) = self._k(), self.top
        scale = torch.stack([torch.exp2((top_pos - self.a_pos) / k_pos),
                             torch.exp2((top_neg - self.a_neg) / k_neg)])
        step = torch.stack([1.0 / k_pos, 1.0 / k_neg])
        return scale, step

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """Set ``mu`` (median), ``k`` and ``a`` (grid search) from the weight ``x``.

        Args:
            x: weight ``[C_out, ...]`` (per channel along ``ch_axis``) or any tensor.
        """
        x = x.detach()
        if x.numel() == 0:
            raise ValueError(f'{self.describe()}: init_from() got an empty tensor')
        axis = self._axis(x.dim())
        rows = to_channel_rows(x.float(), axis)                              # [C, N]
        mu = rows.median(dim=1).values                                      # [C]
        dist = rows - mu[:, None]
        sample = subsample_columns(dist, self.max_search_elements)
        params = {}
        for side, sgn, top in (('pos', 1.0, self.top[0]), ('neg', -1.0, self.top[1])):
            mag_max = (sgn * dist).amax(dim=1).clamp(min=_TINY)             # [C]
            params[side] = self._search_side((sgn * sample).clamp(min=0), mag_max, top)
        shape = channel_shape(rows.shape[0], x.dim(), axis) if axis is not None else []
        dtype = x.dtype if x.is_floating_point() else torch.float32
        self.mu = mu.reshape(shape).to(dtype)
        for side, (k, a) in params.items():
            getattr(self, f'k_{side}').data = k.reshape(shape).to(dtype)
            getattr(self, f'a_{side}').data = a.reshape(shape).to(dtype)
        self._mark_initialized()

    def _search_side(self, mag: Tensor, mag_max: Tensor, top: int) -> tuple[Tensor, Tensor]:
        """Best ``(k, a)`` per row for the magnitudes ``mag [C, N]`` (0 = other side)."""
        if self.search_p == 2:
            return self._search_side_sorted(mag, mag_max, top)
        valid = mag > 0
        log2_mag = torch.log2(mag.clamp(min=_TINY)).unsqueeze(0)             # [1, C, N]
        octaves = torch.linspace(*self.search_octaves, self.num_candidates,
                                 device=mag.device, dtype=mag.dtype)
        best_err = torch.full_like(mag_max, float('inf'))
        best_k = torch.full_like(mag_max, self.k_candidates[0])
        best_a = torch.zeros_like(mag_max)
        chunk = max(1, _SEARCH_CHUNK_ELEMENTS // max(mag.numel(), 1))
        for k in self.k_candidates:
            a0 = top - k * torch.log2(mag_max)                               # top level at max
            for start in range(0, self.num_candidates, chunk):
                a = a0 + k * octaves[start:start + chunk, None]              # [K, C]
                err = self._side_error(log2_mag, mag, valid, k, a, top)      # [K, C]
                chunk_err, idx = err.min(dim=0)
                better = chunk_err < best_err
                best_err = torch.where(better, chunk_err, best_err)
                best_a = torch.where(better, a.gather(0, idx[None])[0], best_a)
                best_k = torch.where(better, torch.full_like(best_k, k), best_k)
        return best_k, best_a

    def _search_side_sorted(self, mag: Tensor, mag_max: Tensor, top: int
                            ) -> tuple[Tensor, Tensor]:
        """:meth:`_search_side` for ``search_p=2`` from per-row prefix sums.

        A candidate's squared error is ``sum_L (S2_L - 2 q_L S1_L + n_L q_L^2)`` over its
        levels ``L`` (``S1``/``S2``: sum of magnitudes / squares in the level's interval),
        so sorting each row once and bucketing by ``searchsorted`` costs
        ``O(K * C * L * log N)`` instead of ``O(K * C * N)`` (R50's 2304-wide regression
        rows: 20-50x faster, measured). Ties at a bucket edge may land one level off the
        dense path.
        """
        octaves = torch.linspace(*self.search_octaves, self.num_candidates,
                                 device=mag.device, dtype=torch.float64)
        rows = mag.double().sort(dim=1).values.contiguous()                  # [C, N]
        zeros = rows.new_zeros(rows.shape[0], 1)
        p1 = torch.cat([zeros, rows.cumsum(1)], 1)                           # [C, N+1]
        p2 = torch.cat([zeros, rows.square().cumsum(1)], 1)
        levels = torch.arange(1, top + 1, device=mag.device, dtype=torch.float64)
        best_err = torch.full_like(mag_max, float('inf'), dtype=torch.float64)
        best_k = torch.full_like(mag_max, self.k_candidates[0])
        best_a = torch.zeros_like(mag_max)
        log2_max = torch.log2(mag_max.double())
        for k in self.k_candidates:
            a = (top - k * log2_max)[None] + k * octaves[:, None]            # [K, C]
            # psi = k*log2(m) + a; level 1 from psi >= 1 - k, level L+1 from psi >= L + .5
            edges = torch.cat([torch.full((1,), 1.0 - k, dtype=torch.float64,
                                          device=mag.device), levels[:-1] + 0.5])
            bounds = torch.exp2((edges[None, None] - a[..., None]) / k)      # [K, C, top]
            num_k, num_c = a.shape
            flat = bounds.permute(1, 0, 2).reshape(num_c, -1).contiguous()
            idx = torch.searchsorted(rows, flat)
            idx = idx.reshape(num_c, num_k, top).permute(1, 0, 2)            # [K, C, top]
            end = torch.cat([idx[..., 1:], idx.new_full((num_k, num_c, 1), rows.shape[1])],
                            -1)
            gather = lambda p, i: p[None].expand(num_k, -1, -1).gather(  # noqa: E731
                2, i.reshape(num_k, num_c, -1))
            s1 = gather(p1, end) - gather(p1, idx)
            s2 = gather(p2, end) - gather(p2, idx)
            count = (end - idx).double()
            q = torch.exp2((levels[None, None] - a[..., None]) / k)           # [K, C, top]
            err = (s2 - 2 * q * s1 + count * q.square()).sum(-1)
            err = err + gather(p2, idx[..., :1])[..., 0]                     # level-0 bucket
            chunk_err, pick = err.min(dim=0)
            better = chunk_err < best_err
            best_err = torch.where(better, chunk_err, best_err)
            best_a = torch.where(better, a.gather(0, pick[None])[0].to(best_a.dtype), best_a)
            best_k = torch.where(better, torch.full_like(best_k, k), best_k)
        return best_k, best_a

    def _side_error(self, log2_mag: Tensor, mag: Tensor, valid: Tensor, k: float, a: Tensor,
                    top: int) -> Tensor:
        """Sum of ``|d - d_q|^p`` over one side for candidates ``a [K, C]`` → ``[K, C]``."""
        a = a.unsqueeze(-1)                                                  # [K, C, 1]
        psi = k * log2_mag + a
        level = torch.where(psi < 1 - k, 0.0, psi.clamp(1, top).round())
        mag_q = torch.exp2((top - a) / k) * torch.exp2((level - top) / k)
        mag_q = torch.where(level > 0, mag_q, 0.0)
        err = (mag_q - mag).abs_().pow_(self.search_p)
        return (err * valid).sum(-1)

    # ------------------------------------------------------------------ forward
    def _codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Float ``sign`` and ``level`` (straight-through in ``psi``) of ``x``."""
        d = x - self.mu
        sign = torch.sign(d).detach()
        pos = sign > 0
        k_pos, k_neg = self._k()
        k = torch.where(pos, k_pos, k_neg)
        a = torch.where(pos, self.a_pos, self.a_neg)
        top = torch.where(pos, float(self.top[0]), float(self.top[1]))
        psi = k * torch.log2(d.abs().clamp(min=_TINY)) + a
        level = round_ste(torch.clamp(psi, min=torch.ones_like(top), max=top))
        zero = ((psi < 1 - k) | (sign == 0)).detach()         # |d| < half the lowest level
        return sign, torch.where(zero, torch.zeros_like(level), level)

    def _fake_quant(self, x: Tensor) -> Tensor:
        sign, level = self._codes(x)
        scale, step = self._scale_step()
        return llaq_dequant(sign, level, self.mu, scale, step, self.top)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What calibration may train: ``a`` (and ``k`` unless :attr:`power_of_two`); none
        when not :attr:`learnable`."""
        if not self.learnable:
            return []
        names = ('a_pos', 'a_neg') if self.power_of_two else ('k_pos', 'a_pos', 'k_neg', 'a_neg')
        return [getattr(self, n) for n in names]

    # ------------------------------------------------------------------ integer form
    @torch.no_grad()
    def to_int(self, x: Tensor) -> LLAQCodes:
        """Integer form of ``x``; :meth:`from_int` gives back :meth:`forward`'s values exactly."""
        self._check_initialized()
        sign, level = self._codes(x)
        scale, step = self._scale_step()
        return LLAQCodes(sign=sign.to(torch.int8), level=level.to(torch.int32),
                         scale=scale.detach().clone(), step=step.detach().clone(),
                         mu=self.mu.detach().clone(), top=self.top)

    @staticmethod
    def from_int(codes: LLAQCodes, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dequantize an :class:`LLAQCodes` (bit-exact with the fake-quantized weight)."""
        return llaq_dequant(codes.sign.to(dtype), codes.level.to(dtype), codes.mu.to(dtype),
                            codes.scale.to(dtype), codes.step.to(dtype), codes.top)

    @torch.no_grad()
    def to_codes(self, x: Tensor) -> Tensor:
        """Signed ``int32`` codes ``sign * level`` in :attr:`quant_range` (for packing)."""
        codes = self.to_int(x)
        return codes.sign.to(torch.int32) * codes.level

    @torch.no_grad()
    def shift_form(self, x: Tensor) -> LLAQShiftForm | None:
        """The weight ``x`` as ``pos * s_+ + neg * s_- + mu`` with int8 powers of two.

        Every level ``l >= 1`` of side ``s`` is ``S_s * 2^((l - L_s) * r_s)``; when
        ``r_s`` is an integer (``k = 1``: :attr:`power_of_two`) this is
        ``(S_s * 2^((1 - L_s) * r_s)) * (1 << (l - 1) * r_s)``: an int8 power of two
        (a shift) times a per-channel scale. Returns None when a step is not an integer, a
        shift does not fit int8 (e.g. more than 4 bits at ``k = 1``), or the channels are
        not along axis 0. The float value equals :meth:`forward`'s bit for bit (checked).
        """
        axis = self._axis(x.dim())
        if axis not in (None, 0) or x.dim() == 0:
            return None
        codes = self.to_int(x)
        step = codes.step.reshape(2, -1)                                    # [2, C or 1]
        if not torch.all(step == torch.round(step)) or torch.any(step < 1):
            return None
        (top_pos, top_neg), r = codes.top, step.to(torch.int64)
        if (top_pos - 1) * int(r[0].max()) > 6 or (top_neg - 1) * int(r[1].max()) > 7:
            return None                                       # 2^e must fit int8 (-128..127)
        rows = x.shape[0]
        col = [rows] + [1] * (x.dim() - 1)

        def per_row(t: Tensor) -> Tensor:
            return t.reshape(-1).expand(rows).clone() if t.numel() == 1 else t.reshape(-1)

        level = codes.level.to(torch.int64)
        expo_pos = ((level - 1).clamp(min=0) * per_row(r[0]).reshape(col))
        expo_neg = ((level - 1).clamp(min=0) * per_row(r[1]).reshape(col))
        live = level > 0
        pos = torch.where((codes.sign > 0) & live, torch.ones_like(level) << expo_pos, 0)
        neg = torch.where((codes.sign < 0) & live, -(torch.ones_like(level) << expo_neg), 0)
        tops = torch.tensor([float(top_pos), float(top_neg)],
                            device=codes.scale.device).reshape(2, 1)
        scale = codes.scale.reshape(2, -1).float() * torch.exp2((1.0 - tops) * step.float())
        form = LLAQShiftForm(pos=pos.to(torch.int8), neg=neg.to(torch.int8),
                             scale_pos=per_row(scale[0]), scale_neg=per_row(scale[1]),
                             mu=per_row(codes.mu.float()))
        if not torch.equal(form.dequantize(), self.forward(x).float()):
            return None
        return form

    def quant_params(self) -> dict[str, Tensor]:
        """Detached ``mu`` ``P``, ``scale`` / ``step`` / ``k`` / ``a`` ``[2, *P]`` (+, -)."""
        scale, step = self._scale_step()
        return {'mu': self.mu.detach(), 'scale': scale.detach(), 'step': step.detach(),
                'k': torch.stack([self.k_pos, self.k_neg]).detach(),
                'a': torch.stack([self.a_pos, self.a_neg]).detach()}

    @torch.no_grad()
    def fake_quant_export(self, x: Tensor) -> Tensor:
        """The fake-quantized weight as a constant (no affine Q/DQ pair describes a log grid)."""
        return self.forward(x).detach()

    def extra_repr(self) -> str:
        granularity = f'per_channel(axis={self.ch_axis})' if self.per_channel else 'per_tensor'
        return (f'{super().extra_repr()}, {granularity}, k_candidates={self.k_candidates}, '
                f'power_of_two={self.power_of_two}, '
                f'learnable={self.learnable}')

