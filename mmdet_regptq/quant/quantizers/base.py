"""Common base of all quantizers: switches, explicit initialisation, the forward contract."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ['Quantizer']

MIN_BITS = 2
MAX_BITS = 16


class Quantizer(nn.Module):
    """Base class of fake quantizers (``nn.Module``; registered in ``QUANTIZERS``).

    Subclasses implement :meth:`init_from`, :meth:`quant_params`, :attr:`quant_range` and
    :meth:`_fake_quant`. Calibration is explicit: :meth:`forward` before
    :meth:`init_from` raises ``RuntimeError`` naming the quantizer, never initialises
    silently.

    Attributes:
        bits: bit width (2..16).
        enabled: when False, :meth:`forward` is the identity.
        name: fully-qualified name used in messages (set by ``quantize_model``).

    The ``initialized`` buffer is saved in state dicts, so a loaded quantized checkpoint
    reports :meth:`is_initialized` correctly. Parameters named in ``_lazy_shapes`` get their
    shape on initialisation; loading a state dict resizes them to the stored shape.
    """

    _lazy_shapes: tuple[str, ...] = ()

    def __init__(self, bits: int, *, name: str = '') -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f'bits={bits!r} is out of range; allowed {MIN_BITS}..{MAX_BITS}')
        self.bits = bits
        self.enabled = True
        self.name = name
        self.register_buffer('initialized', torch.tensor(False))
        self._is_init = False  # host-side mirror of the buffer: no device sync per forward

    # ------------------------------------------------------------------ contract
    @property
    def quant_range(self) -> tuple[int, int]:
        """Integer levels ``(qmin, qmax)``."""
        raise NotImplementedError

    def init_from(self, x: Tensor) -> None:
        """Initialise the quantization parameters from data ``x`` (explicit calibration)."""
        raise NotImplementedError

    def quant_params(self) -> dict[str, Tensor]:
        """Detached parameters needed to export or pack (``scale``, ``zero_point``, ...)."""
        raise NotImplementedError

    def _fake_quant(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared logic
    def is_initialized(self) -> bool:
        """Whether :meth:`init_from` ran (or an initialised state dict was loaded)."""
        return self._is_init

    def _mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._is_init = True

    def describe(self) -> str:
        """Short identification for messages: class name and, if set, the module name."""
        label = type(self).__name__
        return f'{label} {self.name!r}' if self.name else label

    def _check_initialized(self) -> None:
        if not self._is_init:
            raise RuntimeError(
                f'{self.describe()} ({self.bits} bit) is used before init_from(); initialise '
                'weight quantizers from the weights and activation quantizers with '
                'init_activation_quantizers(), or disable it (enabled=False)')

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (same shape); identity when ``enabled`` is False."""
        if not self.enabled:
            return x
        self._check_initialized()
        return self._fake_quant(x)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        for key in self._lazy_shapes:
            incoming = state_dict.get(prefix + key)
            current = getattr(self, key)
            if incoming is not None and incoming.shape != current.shape:
                current.data = torch.empty_like(incoming, device=current.device,
                                                 dtype=current.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_init = bool(self.initialized)

    def extra_repr(self) -> str:
        return f'bits={self.bits}, enabled={self.enabled}, initialized={self._is_init}'
