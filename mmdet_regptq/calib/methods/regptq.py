"""Reg-PTQ (Ding et al., CVPR 2024): LLAQ on the head's regression branch + FGIC."""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Iterable, Sequence

from mmengine.logging import MMLogger
from torch import Tensor, nn

from ...quant import LLAQuantizer, UniformQuantizer, iter_quant_modules
from ...quant.quantizers.llaq import SEARCH_K
from ...registry import PTQ_METHODS, QUANTIZERS, build_from
from ..capture import GradLoss
from ..fgic import FGICConfig, GlobalLoss
from ..losses import FisherMSE, OutputMSE, ReconLoss
from ..reconstruct import OptimGroup, ReconStats, check_local_draw
from ..trace import ForwardFn
from ..units import ReconUnit
from .base import UnitCallback, check_int
from .qdrop import QDrop

__all__ = ['RegPTQ', 'LLAQ_TARGETS', 'LLAQ_ROUNDING', 'AUTO_LEARNED_MAX_BITS']

#: ``llaq`` option → attribute of :class:`RegPTQ` holding the target layer regexes.
LLAQ_TARGETS = {'reg': 'reg_layers', 'head': 'head_layers'}
#: ``llaq_rounding`` option → registered quantizer type of the LLAQ layers (``'auto'``:
#: one of the two by the layer's weight bits, :data:`AUTO_LEARNED_MAX_BITS`).
LLAQ_ROUNDING = {'psi': 'LLAQ', 'learned': 'LLAQRound', 'auto': None}
#: ``llaq_rounding='auto'``: learned rounding at these weight bits and below, ``psi`` above.
#: Chosen on held-out val images 100-299 (docs/accuracy_history.md): at 2 bits learned
#: rounding gained 2.7-3.2 AP on all three bundled detectors; at 3 and 4 bits it was 0.1-0.5
#: AP below.
AUTO_LEARNED_MAX_BITS = 2


@PTQ_METHODS.register_module()
class RegPTQ(QDrop):
    """Reg-PTQ: scale-search init → LLAQ on the head's regression branch → FGIC.

    Follows QDrop's pipeline (drop 0.5 with FP input mixing, AdaRound rounding for uniform
    layers, LSQ activation steps), block-wise inside ``block_scopes`` (the backbone) and
    layer-wise elsewhere. Per unit ``k`` the loss is ``L_H^k + L_G``: ``L_H`` the
    diagonal-Fisher weighted reconstruction error with ``dL_G / dO^k`` captured before the
    unit is trained, ``L_G`` the filtered global loss computed from a :class:`TailRunner`
    forward of the network after the unit (later units FP). The global term's cost is
    logged per unit (tail-forward share and decode/loss seconds).

    The method learns which layers are the head / its regression branch from regexes
    (``re.fullmatch`` on module names): ``quantize_detector`` fills ``head_layers`` and
    ``reg_layers`` from the detector adapter (:meth:`set_layer_defaults`), and
    ``calibrate(global_loss=...)`` takes the adapter's FGIC callable built from
    :attr:`fgic`.

    Args:
        global_loss: add ``L_G`` to every unit's loss (needs ``calibrate(global_loss=...)``).
        fisher: Fisher-weighted ``L_H`` with gradients of ``calibrate``'s ``global_loss``;
            False: plain output MSE.
        conf_filter: FGIC confidence filter (``theta_c``).
        iou_filter: FGIC IoU filter (``theta_i``).
        llaq: LLAQ targets: ``True`` / ``'reg'`` (the regression branch), ``'head'`` (every
            head layer), ``False`` (off: uniform + AdaRound everywhere).
        lambda_: weight of FGIC's box term (our choice 1.0).
        p: exponent of FGIC's box distance (our choice 1).
        theta_c: confidence threshold (2e-4).
        theta_i: IoU threshold (0.1).
        normalize_boxes: FGIC boxes divided by the image size (our choice).
        entropy_offset: FGIC reports CE minus the FP entropy (same gradients).
        global_weight: factor of ``L_G`` in the total (the paper's plain sum: 1).
        global_interval: compute ``L_G`` on every n-th iteration only (1: every one, as
            in the paper); the tail network's forward + backward is most of Reg-PTQ's time.
            Default 32: on held-out val images 100-299 it matched or beat ``1`` on all three
            bundled detectors at W2A4-W4A4 (-0.2 to +0.5 AP) in 0.33-0.39x the time; the
            Fisher weights of ``L_H`` (taken from ``L_G``'s gradients) keep its signal.
        fisher_share: the Fisher weights of this many consecutive units come from one
            tail forward + backward per batch (at the first of them; the later ones are
            still FP in it): 1 is the paper's per-unit ``dL_G / dO^k``. 4 took 1.45-1.5x
            QDrop's time on held-out val images 100-299 (1: 1.7-2.1x) at -0.3 AP on
            average (-1.4 to +0.9) over three detectors x W2A4 / W3A3 / W4A4; 1.39-1.65x
            on the reported first 100 val images (docs/accuracy_history.md, session 16).
        local_draw: what the iterations without ``L_G`` reconstruct from: ``'batch'``
            (all of a calibration batch's calls of the unit, as the ``L_G`` iterations) or
            ``'call'`` (one cached call, as QDrop draws: a head shared by the FPN levels
            runs one level per iteration instead of all of them). ``'call'`` is 20-30%
            faster on RetinaNet / FCOS at 1,000 iterations for -0.04 AP on average on
            held-out images (-0.29 at 100 iterations), so ``'batch'`` stays the default.
        llaq_cfg: options of the ``'LLAQ'`` quantizer (``k_candidates``, ...); bits come
            from each layer's weight quantizer. Default ``k_candidates=SEARCH_K``: the
            paper's ``k=1`` init loses to the uniform grid at 4 bits on Laplace weights
            (1.9x its error, tests/quant/test_quant_llaq.py), a search over ``k`` wins at
            2-6 bits; pass ``llaq_cfg=dict(k_candidates=(1.0,))`` for the literal init, or
            ``llaq_cfg=dict(power_of_two=True)`` to keep ``k = 1`` through calibration:
            then every level is a power of two and ``tvm_int4`` runs the layer as one int8
            convolution of shifts (docs/deploy.md); a learned ``k`` deploys as a float
            convolution (values exact).
        llaq_rounding: ``'psi'`` (the paper: each weight rounds to the nearest level of
            ``psi``, straight-through), ``'learned'`` (our extension, ``'LLAQRound'``:
            AdaRound's per-weight choice between the two neighbouring log levels, trained
            with the uniform layers' rounding and regulariser, hardened at the unit's end)
            or ``'auto'`` (the default: ``'learned'`` on layers with at most
            :data:`AUTO_LEARNED_MAX_BITS` weight bits, ``'psi'`` on the others).
        lr_llaq: Adam lr of LLAQ's ``k`` / ``a`` (our choice 1e-3, cosine-annealed).
        head_layers: regexes of the head's layers (``None``: filled by the engine).
        reg_layers: regexes of the regression branch (``None``: filled by the engine).
        init_scale_method: range method of every uniform quantizer before calibration
            (``'lp'``: Lp search, re-running it only where another method was configured;
            ``None``: keep the policy's).
        init_p: exponent of the ``'lp'`` search (2.4).
        **kwargs: see :class:`QDrop` / :class:`PTQMethod`.
    """

    def __init__(self, *, global_loss: bool = True, fisher: bool = True,
                 conf_filter: bool = True, iou_filter: bool = True, llaq: bool | str = 'reg',
                 lambda_: float = 1.0, p: float = 1.0, theta_c: float = 2e-4,
                 theta_i: float = 0.1, normalize_boxes: bool = True,
                 entropy_offset: bool = True, global_weight: float = 1.0,
                 global_interval: int = 32, fisher_share: int = 1,
                 local_draw: str = 'batch',
                 llaq_cfg: dict | None = None,
                 llaq_rounding: str = 'auto', lr_llaq: float = 1e-3,
                 head_layers: Sequence[str] | None = None,
                 reg_layers: Sequence[str] | None = None,
                 init_scale_method: str | None = 'lp', init_p: float = 2.4,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        llaq = 'reg' if llaq is True else llaq
        if llaq is not False and llaq not in LLAQ_TARGETS:
            raise ValueError(f'llaq={llaq!r} is unknown; allowed: True, False, '
                             f'{sorted(LLAQ_TARGETS)}')
        if global_weight < 0 or lr_llaq < 0:
            raise ValueError(f'global_weight={global_weight} and lr_llaq={lr_llaq} must be >= 0')
        self.global_loss = bool(global_loss)
        self.fisher = bool(fisher)
        self.fgic = FGICConfig(lambda_=lambda_, p=p, theta_c=theta_c, theta_i=theta_i,
                               conf_filter=conf_filter, iou_filter=iou_filter,
                               normalize_boxes=normalize_boxes,
                               entropy_offset=entropy_offset)
        self.llaq = llaq
        self.llaq_cfg = dict(llaq_cfg) if llaq_cfg is not None else {'k_candidates': SEARCH_K}
        for key in ('type', 'bits'):
            if key in self.llaq_cfg:
                raise ValueError(f"llaq_cfg: {key!r} is set by the method; remove it")
        if llaq_rounding not in LLAQ_ROUNDING:
            raise ValueError(f'llaq_rounding={llaq_rounding!r} is unknown; allowed: '
                             f'{sorted(LLAQ_ROUNDING)}')
        self.llaq_rounding = llaq_rounding
        self.global_weight = global_weight
        check_int('global_interval', global_interval, 1)
        self.tail_interval = global_interval
        check_int('fisher_share', fisher_share, 1)
        self.fisher_share = fisher_share
        check_local_draw(local_draw)
        self.local_draw = local_draw
        self.lr_llaq = lr_llaq
        self.head_layers = _patterns('head_layers', head_layers)
        self.reg_layers = _patterns('reg_layers', reg_layers)
        self.init_scale_method = init_scale_method
        self.init_p = init_p
        self._global_term: GlobalLoss | None = None

    # ------------------------------------------------------------------ layer selection
    def set_layer_defaults(self, *, head: Sequence[str], regression: Sequence[str]) -> None:
        """Fill ``head_layers`` / ``reg_layers`` that were not given (the engine's adapter)."""
        if self.head_layers is None:
            self.head_layers = _patterns('head_layers', head)
        if self.reg_layers is None:
            self.reg_layers = _patterns('reg_layers', regression)

    def llaq_patterns(self) -> list[str]:
        """Regexes of the layers that get LLAQ weight quantizers (``[]`` when off)."""
        if self.llaq is False:
            return []
        attr = LLAQ_TARGETS[self.llaq]
        patterns = getattr(self, attr)
        if patterns is None:
            raise ValueError(f'RegPTQ(llaq={self.llaq!r}) needs {attr}=[regex, ...]: the '
                             'engine fills it from the detector adapter; pass it when calling '
                             'calibrate() directly, or set llaq=False')
        return patterns

    def install_llaq(self, model: nn.Module) -> list[str]:
        """Swap the weight quantizers of the LLAQ target layers for initialised LLAQ ones.

        Returns:
            The names of the layers that got LLAQ (already-LLAQ layers included).
        """
        patterns = self.llaq_patterns()
        done = []
        for name, layer in iter_quant_modules(model):
            if not any(re.fullmatch(p, name) for p in patterns):
                continue
            if not any(isinstance(q, LLAQuantizer) for q in layer.weight_quantizers().values()):
                layer.replace_weight_quantizer(self._llaq_factory)
            done.append(name)
        if patterns and not done:
            MMLogger.get_current_instance().warning(
                f'RegPTQ: llaq={self.llaq!r} patterns {patterns} match no quantized layer; '
                'every layer keeps its uniform quantizer')
        return done

    def _llaq_factory(self, old: nn.Module, weight: Tensor) -> nn.Module:
        if isinstance(old, LLAQuantizer):
            return old
        q = build_from(QUANTIZERS, dict(self.llaq_cfg, type=self.llaq_type(old.bits),
                                        bits=old.bits, name=old.name), 'llaq_cfg')
        q.to(weight.device)
        q.init_from(weight)
        return q

    def llaq_type(self, bits: int) -> str:
        """Registered quantizer type of an LLAQ layer with ``bits`` weight bits."""
        if self.llaq_rounding == 'auto':
            return 'LLAQRound' if bits <= AUTO_LEARNED_MAX_BITS else 'LLAQ'
        return LLAQ_ROUNDING[self.llaq_rounding]

    def _adaround_factory(self, base: nn.Module, weight: Tensor) -> nn.Module:
        if isinstance(base, LLAQuantizer):  # LLAQ rounds with its own straight-through psi
            return base
        return super()._adaround_factory(base, weight)

    # ------------------------------------------------------------------ configuration
    def needs_fisher(self) -> bool:
        return self.fisher

    def prepare_unit(self, unit: ReconUnit) -> list[OptimGroup]:
        groups = super().prepare_unit(unit)
        llaq = [p for _, layer in unit.layers for q in layer.weight_quantizers().values()
                if isinstance(q, LLAQuantizer) for p in q.trainable_parameters()]
        if llaq and self.lr_llaq > 0:
            groups.append(OptimGroup('llaq', llaq, self.lr_llaq, cosine=True))
        return groups

    def losses(self, unit: ReconUnit, *, output_fn: Callable[[Any], Tensor] | None,
               global_loss: GradLoss | None) -> list[ReconLoss]:
        terms = super().losses(unit, output_fn=output_fn, global_loss=global_loss)
        if self.fisher:
            terms = [FisherMSE() if isinstance(t, OutputMSE) else t for t in terms]
        self._global_term = None
        if self.global_loss:
            if global_loss is None:
                raise ValueError(_NEEDS_GLOBAL)
            self._global_term = GlobalLoss(loss_fn=global_loss, weight=self.global_weight)
            terms.append(self._global_term)
        return terms

    def restore_finished(self, model: nn.Module, units: Sequence[ReconUnit],
                         num_finished: int) -> None:
        """Also installs LLAQ on every target layer, so a partial checkpoint loads."""
        self.install_llaq(model)
        super().restore_finished(model, units, num_finished)

    # ------------------------------------------------------------------ steps
    def init_scales(self, model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn,
                    seed: int = 0) -> None:
        """Lp scale search of the uniform quantizers, LLAQ install, activation scales."""
        if self.init_scale_method is not None:
            _research_uniform(model, self.init_scale_method, self.init_p)
        names = self.install_llaq(model)
        MMLogger.get_current_instance().info(f'RegPTQ: LLAQ ({self.llaq}) on {len(names)} '
                                             f'layers: {names}')
        super().init_scales(model, batches, forward_fn, seed=seed)

    def calibrate(self, model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn, *,
                  output_fn: Callable[[Any], Tensor] | None = None,
                  global_loss: GradLoss | None = None, logger: logging.Logger | None = None,
                  on_unit_end: UnitCallback | None = None, start_unit: int = 0,
                  seed: int = 0, tail_fn: ForwardFn | None = None) -> list[ReconStats]:
        """See :meth:`PTQMethod.calibrate`; ``global_loss`` is the FGIC callable."""
        logger = logger or MMLogger.get_current_instance()
        if self.global_loss and global_loss is None:
            raise ValueError(_NEEDS_GLOBAL)
        if start_unit == 0:
            self.llaq_patterns()  # fail before any work when the targets are unknown
        totals = {'tail': 0.0, 'loss': 0.0, 'seconds': 0.0}

        def unit_end(k: int, unit: ReconUnit, stats: ReconStats) -> None:
            term = self._global_term
            if term is not None:
                totals['tail'] += stats.tail_share * stats.seconds
                totals['loss'] += term.seconds
                totals['seconds'] += stats.seconds
                logger.info(f'RegPTQ {unit.name}: global term = tail forwards '
                            f'{stats.tail_share:.0%} of the loop + decode/FGIC '
                            f'{term.seconds:.2f}s of {stats.seconds:.2f}s')
            if on_unit_end is not None:
                on_unit_end(k, unit, stats)

        stats = super().calibrate(model, batches, forward_fn, output_fn=output_fn,
                                  global_loss=global_loss, logger=logger,
                                  on_unit_end=unit_end, start_unit=start_unit, seed=seed,
                                  tail_fn=tail_fn)
        if totals['seconds'] > 0:
            share = (totals['tail'] + totals['loss']) / totals['seconds']
            logger.info(f'RegPTQ: the global term took about {share:.0%} of '
                        f'{totals["seconds"]:.1f}s of reconstruction')
        return stats


_NEEDS_GLOBAL = ('RegPTQ(global_loss=True) needs calibrate(global_loss=...): the FGIC '
                 'callable built by the detector adapter (adapter.global_loss(method.fgic)); '
                 'or set global_loss=False')


def _patterns(field: str, patterns: Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        raise ValueError(f'{field}={patterns!r} must be a list of regex strings')
    out = list(patterns)
    for pattern in out:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f'{field}: {pattern!r} is not a valid regex ({err})') from None
    return out


def _research_uniform(model: nn.Module, method: str, p: float) -> None:
    """Set ``scale_method`` / ``p`` of every uniform quantizer; re-initialise the weight
    quantizers whose setting changed (activations are initialised afterwards anyway)."""
    for _, layer in iter_quant_modules(model):
        weights = layer.weight_quantizers()
        for slot, q in [*weights.items(), *layer.input_quantizers().items()]:
            if not isinstance(q, UniformQuantizer):
                continue
            changed = q.scale_method != method or (method == 'lp' and q.p != p)
            q.scale_method, q.p = method, (p if method == 'lp' else q.p)
            if changed and weights.get(slot) is q:
                q.init_from(layer.float_weight(slot).detach())
