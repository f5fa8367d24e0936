"""Quantized wrappers of Conv2d / Linear / MultiheadAttention (module swapping).

A wrapper holds the original float module as ``.module`` (weights shared, never copied) and
its quantizers as child modules. Each quantized tensor has a *slot*: weight slots name a
parameter of ``.module`` (``'weight'``, ``'in_proj_weight'``, ``'out_proj.weight'``, ...),
input slots name a forward argument (``'input'``, ``'query'``, ``'key'``, ``'value'``);
every slot maps to the attribute holding its quantizer. The first slot is the primary
one: ``weight_quantizer`` / ``input_quantizer``.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantizers import Quantizer

__all__ = ['QuantModule', 'QuantConv2d', 'QuantLinear', 'QuantMultiheadAttention',
           'QuantizerFactory']

#: ``factory(old_quantizer, float_weight) -> new_quantizer``, e.g. ``AdaRoundQuantizer``.
QuantizerFactory = Callable[[Quantizer, Tensor], Quantizer]


def _state_key(weight: Tensor, quantizer: Quantizer) -> tuple:
    """What a cached fake-quantized weight depends on: every tensor's storage, version,
    shape and dtype, and the quantizer's switches."""
    tensors = [weight, *quantizer.parameters(), *quantizer.buffers()]
    return (tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)
                  for t in tensors),
            quantizer.enabled, quantizer.bits, quantizer.is_initialized(),
            getattr(quantizer, 'soft_targets', None))


class QuantModule(nn.Module):
    """Base of the quantized wrappers.

    Args:
        module: the float module (kept as ``.module``; its parameters are shared).
        weight_quantizer: quantizer of the primary weight slot, or ``None`` (FP weight).
        input_quantizer: quantizer of the primary input slot, or ``None`` (FP input).

    Attributes:
        quant_weight: weight quantization switch (``set_quant``).
        quant_input: input quantization switch (``set_quant``).
        drop_prob: QDrop probability: in training mode each input element keeps its FP value
            with this probability, otherwise its quantized value.
        act_ch_axis: channel axis of the inputs, for per-channel activation quantizers.

    Attributes not found on the wrapper are looked up on ``.module`` (``in_channels``,
    ``weight``, ...), so code reading the wrapped layer keeps working.
    """

    #: cache fake-quantized weights in evaluation (one weight copy per layer; set False
    #: on the class or an instance to save that memory)
    cache_weights: ClassVar[bool] = True
    _weight_slots: ClassVar[dict[str, str]] = {'weight': 'weight_quantizer'}
    _input_slots: ClassVar[dict[str, str]] = {'input': 'input_quantizer'}
    act_ch_axis: ClassVar[int] = 1

    def __init__(self, module: nn.Module, weight_quantizer: Quantizer | None = None,
                 input_quantizer: Quantizer | None = None) -> None:
        super().__init__()
        self.module = module
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.quant_weight = True
        self.quant_input = True
        self._drop_prob = 0.0

    # ------------------------------------------------------------------ slots
    def weight_slots(self) -> dict[str, str]:
        """Weight slot → attribute of its quantizer (primary slot first)."""
        return dict(self._weight_slots)

    def input_slots(self) -> dict[str, str]:
        """Input slot → attribute of its quantizer (primary slot first)."""
        return dict(self._input_slots)

    def float_weight(self, slot: str) -> Tensor:
        """The float weight of ``slot`` (a dotted path inside ``.module``)."""
        obj: Any = self.module
        for part in slot.split('.'):
            obj = getattr(obj, part)
        return obj

    def float_weights(self) -> dict[str, Tensor]:
        """Every weight slot → its float weight."""
        return {slot: self.float_weight(slot) for slot in self.weight_slots()}

    def weight_quantizers(self) -> dict[str, Quantizer | None]:
        """Every weight slot → its quantizer (``None`` = FP)."""
        return {slot: getattr(self, attr) for slot, attr in self.weight_slots().items()}

    def input_quantizers(self) -> dict[str, Quantizer | None]:
        """Every input slot → its quantizer (``None`` = FP)."""
        return {slot: getattr(self, attr) for slot, attr in self.input_slots().items()}

    # ------------------------------------------------------------------ quantized tensors
    def quantized_weight(self, slot: str | None = None) -> Tensor:
        """Weight of ``slot`` (default primary) after its quantizer, if on.

        Without autograd (evaluation) the result is cached until the weight or any tensor
        of the quantizer changes (storage or in-place version) or its switches do: the
        weights of a calibrated model are fixed, so inference quantizes each one once.
        """
        slot = slot or next(iter(self.weight_slots()))
        weight = self.float_weight(slot)
        quantizer = getattr(self, self.weight_slots()[slot])
        if quantizer is None or not self.quant_weight:
            return weight
        if (not self.cache_weights or torch.is_grad_enabled() or torch.jit.is_tracing()
                or torch.jit.is_scripting()
                or 'forward' in quantizer.__dict__):      # export_mode patched it
            return quantizer(weight)
        key = _state_key(weight, quantizer)
        cache = self.__dict__.setdefault('_weight_cache', {})
        hit = cache.get(slot)
        if hit is not None and hit[0] == key:
            return hit[1]
        out = quantizer(weight)
        cache[slot] = (key, out)
        return out

    def quantize_input(self, x: Tensor, slot: str | None = None) -> Tensor:
        """Input ``x`` of ``slot`` (default primary) after its quantizer and QDrop."""
        slot = slot or next(iter(self.input_slots()))
        quantizer = getattr(self, self.input_slots()[slot])
        if quantizer is None or not self.quant_input:
            return x
        xq = quantizer(x)
        if self._drop_prob > 0 and self.training:
            xq = torch.where(torch.rand_like(x) < self._drop_prob, x, xq)
        return xq

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def init_weight_quantizers(self) -> None:
        """``init_from`` every weight quantizer with its float weight."""
        for slot, quantizer in self.weight_quantizers().items():
            if quantizer is not None:
                quantizer.init_from(self.float_weight(slot).detach())

    def set_quant(self, weight: bool | None = None, input: bool | None = None) -> None:
        """Switch weight and/or input quantization (``None`` leaves a switch unchanged)."""
        if weight is not None:
            self.quant_weight = bool(weight)
        if input is not None:
            self.quant_input = bool(input)

    @property
    def drop_prob(self) -> float:
        """QDrop probability in ``[0, 1]``."""
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'drop_prob={p} is out of range; allowed 0..1')
        self._drop_prob = float(p)

    def replace_weight_quantizer(self, q: Quantizer | QuantizerFactory,
                                 slot: str | None = None) -> None:
        """Swap weight quantizers (e.g. Uniform → AdaRound / LLAQ).

        Args:
            q: a built quantizer, put in ``slot``; or a factory
                ``(old_quantizer, float_weight) -> new_quantizer`` (``AdaRoundQuantizer``
                itself is one), applied to ``slot`` or, when ``slot`` is None, to every
                weight slot that has a quantizer (MultiheadAttention has several).
            slot: weight slot; ``None`` = primary slot for a built quantizer, all slots
                for a factory.
        """
        slots = self.weight_slots()
        if slot is not None and slot not in slots:
            raise KeyError(f'slot={slot!r} is unknown; allowed: {sorted(slots)}')
        if isinstance(q, nn.Module):
            setattr(self, slots[slot or next(iter(slots))], q)
            return
        for name in ([slot] if slot else list(slots)):
            old = getattr(self, slots[name])
            if old is not None:
                setattr(self, slots[name], q(old, self.float_weight(name).detach()))

    @property
    def w_bits(self) -> int | None:
        """Bits of the primary weight quantizer (``None`` = FP)."""
        q = getattr(self, next(iter(self.weight_slots().values())))
        return None if q is None else q.bits

    @property
    def a_bits(self) -> int | None:
        """Bits of the primary input quantizer (``None`` = FP)."""
        q = getattr(self, next(iter(self.input_slots().values())))
        return None if q is None else q.bits

    def to_float(self) -> nn.Module:
        """The wrapped float module (with the shared, unmodified weights)."""
        return self.module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get('_modules', {}).get('module')
            if module is None or name.startswith('_'):
                raise
            return getattr(module, name)

    def extra_repr(self) -> str:
        return (f'w_bits={self.w_bits}, a_bits={self.a_bits}, quant_weight={self.quant_weight}, '
                f'quant_input={self.quant_input}, drop_prob={self._drop_prob}')


class QuantConv2d(QuantModule):
    """Quantized ``nn.Conv2d``: input ``[N, C_in, H, W]`` → ``[N, C_out, H', W']``."""

    act_ch_axis = 1

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantize_input(x)
        return self.module._conv_forward(x, self.quantized_weight(), self.module.bias)


class QuantLinear(QuantModule):
    """Quantized ``nn.Linear``: input ``[..., C_in]`` → ``[..., C_out]``."""

    act_ch_axis = -1

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.module.bias)


class QuantMultiheadAttention(QuantModule):
    """Quantized ``nn.MultiheadAttention`` (same call signature and outputs).

    Weight slots (per output row, ``ch_axis=0``): ``'in_proj_weight'`` ``[3E, E]``
    (``weight_quantizer``) and ``'out_proj.weight'`` ``[E, E]`` (``out_weight_quantizer``);
    with different key/value dims: ``'q_proj_weight'`` / ``'k_proj_weight'`` /
    ``'v_proj_weight'`` (``weight_quantizer`` / ``k_weight_quantizer`` /
    ``v_weight_quantizer``) and ``'out_proj.weight'``. Input slots, one quantizer each:
    ``'query'`` (``input_quantizer``), ``'key'`` (``key_quantizer``), ``'value'``
    (``value_quantizer``); separate because DETR-style layers feed ``query + pos`` as
    query/key and the bare features as value. Biases, attention scores and softmax stay FP.

    Args:
        module: the ``nn.MultiheadAttention``.
        weight_quantizer: primary weight quantizer; the other weight slots get deep copies
            (initialised from their own weights if this one is initialised).
        input_quantizer: query quantizer; key/value get deep copies.
        **slot_quantizers: explicit quantizers for other slots by attribute name
            (``key_quantizer=...``, ``out_weight_quantizer=...``).
    """

    act_ch_axis = -1
    _input_slots = {'query': 'input_quantizer', 'key': 'key_quantizer',
                    'value': 'value_quantizer'}

    def __init__(self, module: nn.MultiheadAttention, weight_quantizer: Quantizer | None = None,
                 input_quantizer: Quantizer | None = None, **slot_quantizers: Quantizer) -> None:
        super().__init__(module, weight_quantizer, input_quantizer)
        extra_attrs = ([a for a in self.weight_slots().values()][1:]
                       + [a for a in self.input_slots().values()][1:])
        unknown = set(slot_quantizers) - set(extra_attrs)
        if unknown:
            raise TypeError(f'unknown quantizer slots {sorted(unknown)}; allowed: {extra_attrs}')
        for slot, attr in list(self.weight_slots().items())[1:]:
            if attr in slot_quantizers:
                q = slot_quantizers[attr]
            else:
                q = _copy_or_none(weight_quantizer)
                if q is not None and q.is_initialized():
                    q.init_from(self.float_weight(slot).detach())
            setattr(self, attr, q)
        for attr in list(self.input_slots().values())[1:]:
            setattr(self, attr, slot_quantizers.get(attr, _copy_or_none(input_quantizer)))

    def weight_slots(self) -> dict[str, str]:
        if self.module._qkv_same_embed_dim:
            return {'in_proj_weight': 'weight_quantizer', 'out_proj.weight': 'out_weight_quantizer'}
        return {'q_proj_weight': 'weight_quantizer', 'k_proj_weight': 'k_weight_quantizer',
                'v_proj_weight': 'v_weight_quantizer', 'out_proj.weight': 'out_weight_quantizer'}

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Same as ``nn.MultiheadAttention.forward`` (``[L, N, E]``, or ``[N, L, E]`` if
        ``batch_first``) with quantized inputs and weights."""
        m = self.module
        is_batched = query.dim() == 3
        query, key, value = (self.quantize_input(t, slot)
                             for t, slot in ((query, 'query'), (key, 'key'), (value, 'value')))
        if m.batch_first and is_batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        if m._qkv_same_embed_dim:
            proj: dict[str, Any] = {'in_proj_weight': self.quantized_weight('in_proj_weight')}
        else:
            proj = {'in_proj_weight': m.in_proj_weight, 'use_separate_proj_weight': True,
                    **{s: self.quantized_weight(s)
                       for s in ('q_proj_weight', 'k_proj_weight', 'v_proj_weight')}}
        in_proj_weight = proj.pop('in_proj_weight')
        out, weights = F.multi_head_attention_forward(
            query, key, value, m.embed_dim, m.num_heads, in_proj_weight, m.in_proj_bias,
            m.bias_k, m.bias_v, m.add_zero_attn, m.dropout,
            self.quantized_weight('out_proj.weight'), m.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal, **proj)
        if m.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights


def _copy_or_none(q: Quantizer | None) -> Quantizer | None:
    return None if q is None else copy.deepcopy(q)
