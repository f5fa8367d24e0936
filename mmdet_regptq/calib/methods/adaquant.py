"""AdaQuant (Hubara et al. 2021): layer-wise learning of the weights themselves."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ...registry import PTQ_METHODS
from ..reconstruct import OptimGroup
from ..units import ReconUnit
from .base import PTQMethod, act_scale_params


@PTQ_METHODS.register_module()
class AdaQuant(PTQMethod):
    """Learns each layer's float weights and biases (straight-through the uniform weight
    quantizer, scales frozen) and the LSQ activation steps, minimising the output MSE.

    The wrappers share their weights with the float modules, so the learned weights change
    the model. Full-precision passes (targets of later layers) swap the original weights
    back in through :meth:`fp_context`; they are snapshotted by :meth:`prepare_unit`.

    Args:
        block_scopes: ``()``: layer-wise.
        **kwargs: see :class:`PTQMethod` (``lr_weight`` 1e-5, ``lr_act`` 4e-5).
    """

    adaround = False

    def __init__(self, *, block_scopes: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(block_scopes=block_scopes, **kwargs)
        self._fp_params: dict[nn.Parameter, Tensor] = {}

    def prepare_unit(self, unit: ReconUnit) -> list[OptimGroup]:
        params = [p for _, layer in unit.layers for p in layer.to_float().parameters()]
        for p in params:
            self._fp_params.setdefault(p, p.detach().clone())
        groups = [OptimGroup('weight', params, self.lr_weight)]
        if self.learn_act:
            groups.append(OptimGroup('act_scale', act_scale_params(unit), self.lr_act,
                                     cosine=True))
        return groups

    @contextlib.contextmanager
    def fp_context(self) -> Iterator[None]:
        learned = {p: p.data for p in self._fp_params}
        try:
            with torch.no_grad():
                for p, fp in self._fp_params.items():
                    p.data = fp
            yield
        finally:
            for p, data in learned.items():
                p.data = data
