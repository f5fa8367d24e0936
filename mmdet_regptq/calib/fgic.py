"""FGIC: Reg-PTQ's filtered global loss between full-precision and quantized predictions.

For one set of ``n`` predictions (one image of one detection stage):

    L_G = 1/n * sum_i [ CE(y_i, yhat_i) + lambda * || (b_i - bhat_i) * m_i ||_p^p ]
    m_i = 1[max_c y_ic >= theta_C] * 1[IoU(b_i, bhat_i) >= theta_I]

``y`` / ``yhat``: FP / quantized class probabilities; ``b`` / ``bhat``: FP / quantized decoded
boxes (x1, y1, x2, y2), divided by the image width and height. Only the box term is masked
and ``n`` stays the normaliser (as the paper writes it). The CE is soft-target: a per-class
binary CE summed over classes for sigmoid heads, the softmax CE for softmax heads (whose last
column is the background, left out of the confidence filter). The mask is a constant (no
gradient); gradients flow into the quantized side only.

Our choices (options of :class:`FGICConfig`): ``lambda = 1``, ``p = 1``, boxes normalised
by the image size, the FP entropy subtracted from the CE (a constant: the gradients are the
paper's CE, the value reads 0 at a perfect match), class-specific boxes ``[n, K, 4]``
compared at the FP model's top foreground class, several sets (images) averaged and several
stages (RPN, RoI) summed.

Pure PyTorch: the detection-specific decoding of raw outputs is passed in as a callable
(``models/`` builds it from the detector's head).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..registry import RECON_LOSSES
from .losses import ReconContext, ReconLoss

__all__ = ['DetPredictions', 'FGICConfig', 'FilterCounts', 'aligned_iou', 'soft_cross_entropy', 'fgic_mask',
           'fgic_set_loss', 'fgic_loss', 'FGICLoss', 'GlobalLoss']

#: ``decode(raw_outputs) -> {stage: [DetPredictions per image]}``
StageDecoder = Callable[[Any], Mapping[str, Sequence['DetPredictions']]]


@dataclass(eq=False)
class DetPredictions:
    """Per-prediction outputs of one image (one stage), as the global losses consume them.

    Attributes:
        scores: class probabilities ``[N, C]``: independent sigmoids (``sigmoid=True``), or a
            softmax over ``C`` whose last column is the background (``sigmoid=False``).
        boxes: decoded boxes ``[N, 4]`` (x1, y1, x2, y2) in input-image pixels, or
            class-specific ``[N, K, 4]`` (K foreground classes).
        img_shape: ``(h, w)`` of the image, used to normalise the boxes (``None``: not
            normalised).
        sigmoid: whether ``scores`` are per-class sigmoids.
    """

    scores: Tensor
    boxes: Tensor
    img_shape: tuple[int, int] | None = None
    sigmoid: bool = True


@dataclass
class FilterCounts:
    """How many predictions FGIC's two-step filter saw and kept (summed over calls).

    Attributes:
        total: predictions seen.
        confident: kept by the confidence filter (``max_c y_ic >= theta_C``; all when off).
        kept: kept by both filters (``m_i = 1``).
    """

    total: int = 0
    confident: int = 0
    kept: int = 0

    def add(self, total: int, confident: int, kept: int) -> None:
        self.total += total
        self.confident += confident
        self.kept += kept

    def describe(self) -> str:
        """``'FGIC filter kept 41.2% of 12000 predictions (confidence 63.0%)'``."""
        if self.total == 0:
            return 'FGIC filter saw no predictions'
        return (f'FGIC filter kept {self.kept / self.total:.1%} of {self.total} predictions '
                f'(confidence filter {self.confident / self.total:.1%})')


@dataclass(frozen=True)
class FGICConfig:
    """Options of the filtered global loss (validated on construction).

    Attributes:
        lambda_: weight of the box term (our choice 1.0).
        p: exponent of the box distance, ``>= 1`` (our choice 1: L1).
        theta_c: confidence threshold of the filter (paper 2e-4).
        theta_i: IoU threshold of the filter (paper 0.1).
        conf_filter: apply the confidence filter.
        iou_filter: apply the IoU filter.
        normalize_boxes: divide box coordinates by the image width / height.
        entropy_offset: subtract the FP entropy from the CE (same gradients).
        eps: probabilities are clamped to ``[eps, 1 - eps]`` inside the logarithms.
    """

    lambda_: float = 1.0
    p: float = 1.0
    theta_c: float = 2e-4
    theta_i: float = 0.1
    conf_filter: bool = True
    iou_filter: bool = True
    normalize_boxes: bool = True
    entropy_offset: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.lambda_ >= 0:
            raise ValueError(f'lambda_={self.lambda_} must be >= 0')
        if not self.p >= 1:
            raise ValueError(f'p={self.p} must be >= 1 (|x|^p has no gradient at 0 below 1)')
        for name in ('theta_c', 'theta_i'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f'{name}={getattr(self, name)} is out of range; allowed 0..1')
        if not 0 < self.eps < 0.5:
            raise ValueError(f'eps={self.eps} must be in (0, 0.5)')

    @classmethod
    def from_cfg(cls, cfg: FGICConfig | Mapping[str, Any] | None) -> FGICConfig:
        """Build from a dict (unknown keys raise ``ValueError``) or pass an object through."""
        if isinstance(cfg, cls):
            return cfg
        cfg = dict(cfg or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(allowed))
        if unknown:
            raise ValueError(f'unknown FGIC fields {unknown}; allowed: {allowed}')
        return cls(**cfg)


def aligned_iou(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """IoU of paired boxes ``a[i]`` / ``b[i]`` (``[N, 4]`` x1y1x2y2 each) → ``[N]``."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=eps)


def soft_cross_entropy(target: Tensor, pred: Tensor, *, sigmoid: bool, eps: float = 1e-6,
                       entropy_offset: bool = False) -> Tensor:
    """Soft-target CE per prediction: ``[N, C]`` probabilities each → ``[N]``.

    Args:
        target: FP probabilities (treated as constants).
        pred: quantized probabilities.
        sigmoid: per-class binary CE summed over ``C``; else ``-sum_c y_c log yhat_c``.
        eps: clamp of the probabilities inside the logarithms.
        entropy_offset: subtract the entropy of ``target`` (the result is then a KL).
    """
    y = target.detach().clamp(eps, 1 - eps)
    q = pred.clamp(eps, 1 - eps)
    if sigmoid:
        ce = -(y * q.log() + (1 - y) * (1 - q).log())
        ent = -(y * y.log() + (1 - y) * (1 - y).log()) if entropy_offset else None
    else:
        ce = -(y * q.log())
        ent = -(y * y.log()) if entropy_offset else None
    ce = ce.sum(dim=-1)
    return ce - ent.sum(dim=-1) if ent is not None else ce


def _foreground(preds: DetPredictions) -> Tensor:
    return preds.scores if preds.sigmoid else preds.scores[:, :-1]


def _paired_boxes(fp: DetPredictions, q: DetPredictions) -> tuple[Tensor, Tensor]:
    """``[N, 4]`` FP and quantized boxes; class-specific ones at the FP top class."""
    if fp.boxes.dim() == 2:
        return fp.boxes.detach(), q.boxes
    cls = _foreground(fp).detach().argmax(dim=1)                            # [N]
    index = cls.view(-1, 1, 1).expand(-1, 1, 4)
    return fp.boxes.detach().gather(1, index)[:, 0], q.boxes.gather(1, index)[:, 0]


def _normaliser(preds: DetPredictions, boxes: Tensor, cfg: FGICConfig) -> Tensor | None:
    if not cfg.normalize_boxes or preds.img_shape is None:
        return None
    h, w = preds.img_shape
    return boxes.new_tensor([w, h, w, h]).clamp(min=1)


@torch.no_grad()
def fgic_mask(fp: DetPredictions, q: DetPredictions, cfg: FGICConfig | None = None,
              counts: FilterCounts | None = None) -> Tensor:
    """The two-step filter ``m [N]`` (bool): FP confidence, then IoU of FP and quantized box.

    Args:
        counts: when given, the predictions seen / kept are added to it.
    """
    cfg = cfg or FGICConfig()
    fp_boxes, q_boxes = _paired_boxes(fp, q)
    mask = torch.ones(fp_boxes.shape[0], dtype=torch.bool, device=fp_boxes.device)
    if cfg.conf_filter:
        mask &= _foreground(fp).amax(dim=1) >= cfg.theta_c
    confident = int(mask.sum()) if counts is not None else 0
    if cfg.iou_filter:
        mask &= aligned_iou(fp_boxes.float(), q_boxes.float()) >= cfg.theta_i
    if counts is not None:
        counts.add(mask.numel(), confident, int(mask.sum()))
    return mask


def fgic_set_loss(fp: DetPredictions, q: DetPredictions, cfg: FGICConfig | None = None,
                  counts: FilterCounts | None = None) -> Tensor:
    """``L_G`` of one prediction set (scalar); ``counts`` receives the filter's tally.

    Raises:
        ValueError: mismatched shapes between the FP and the quantized predictions.
    """
    cfg = cfg or FGICConfig()
    if fp.scores.shape != q.scores.shape or fp.boxes.shape != q.boxes.shape:
        raise ValueError(f'FGIC: FP and quantized predictions differ in shape: scores '
                         f'{tuple(fp.scores.shape)} vs {tuple(q.scores.shape)}, boxes '
                         f'{tuple(fp.boxes.shape)} vs {tuple(q.boxes.shape)}')
    n = fp.scores.shape[0]
    if n == 0:
        return q.scores.sum() * 0.0
    ce = soft_cross_entropy(fp.scores, q.scores, sigmoid=fp.sigmoid, eps=cfg.eps,
                            entropy_offset=cfg.entropy_offset)
    fp_boxes, q_boxes = _paired_boxes(fp, q)
    diff = q_boxes - fp_boxes
    norm = _normaliser(fp, diff, cfg)
    if norm is not None:
        diff = diff / norm
    dist = diff.abs() if cfg.p == 1 else diff.abs().pow(cfg.p)
    mask = fgic_mask(fp, q, cfg, counts)
    box = torch.where(mask[:, None], dist, torch.zeros_like(dist)).sum(dim=1)
    return (ce + cfg.lambda_ * box).sum() / n


def fgic_loss(fp_sets: Sequence[DetPredictions], q_sets: Sequence[DetPredictions],
              cfg: FGICConfig | None = None, counts: FilterCounts | None = None) -> Tensor:
    """Mean of :func:`fgic_set_loss` over paired prediction sets (e.g. the images)."""
    if len(fp_sets) != len(q_sets) or not fp_sets:
        raise ValueError(f'FGIC: got {len(fp_sets)} FP and {len(q_sets)} quantized prediction '
                         'sets; need the same non-zero number')
    return sum(fgic_set_loss(f, q, cfg, counts) for f, q in zip(fp_sets, q_sets)) / len(fp_sets)


class FGICLoss:
    """``global_loss(fp_raw, q_raw) -> scalar`` on raw model outputs.

    Args:
        decode: ``decode(raw) -> {stage: [DetPredictions per image]}`` (the detector
            adapter's ``decode_stages``); the FP side is decoded without gradients.
        cfg: :class:`FGICConfig` or a dict of its fields.

    The stage losses (:func:`fgic_loss`, averaged over images) are summed.
    """

    def __init__(self, decode: StageDecoder, cfg: FGICConfig | Mapping[str, Any] | None = None
                 ) -> None:
        self.decode = decode
        self.cfg = FGICConfig.from_cfg(cfg)

    def __call__(self, fp_raw: Any, q_raw: Any) -> Tensor:
        return self.loss_decoded(self.decode_target(fp_raw), q_raw)

    @torch.no_grad()
    def decode_target(self, fp_raw: Any) -> Mapping[str, Sequence[DetPredictions]]:
        """The FP side, decoded once (it is the same at every iteration on one batch)."""
        return self.decode(fp_raw)

    def loss_decoded(self, fp: Mapping[str, Sequence[DetPredictions]], q_raw: Any,
                     counts: FilterCounts | None = None) -> Tensor:
        """``L_G`` from the decoded FP predictions (:meth:`decode_target`) and raw
        quantized outputs; ``counts`` receives the filter's tally."""
        q = self.decode(q_raw)
        if set(fp) != set(q):
            raise ValueError(f'FGIC: stages differ: {sorted(fp)} vs {sorted(q)}')
        return sum(fgic_loss(fp[stage], q[stage], self.cfg, counts) for stage in fp)


@RECON_LOSSES.register_module()
class GlobalLoss(ReconLoss):
    """Reg-PTQ's ``L_G`` as a reconstruction term: ``weight * loss_fn(fp_final, q_final)``.

    The final outputs come from a :class:`TailRunner` forward (only the network after the
    unit). ``seconds`` accumulates the time spent in ``loss_fn`` (decoding + loss), so the
    method can log the global term's cost beside the tail share. A ``loss_fn`` with
    ``decode_target`` / ``loss_decoded`` (:class:`FGICLoss`) decodes each batch's FP
    outputs once (by ``ctx.decode_target``, for the whole calibration; else once per
    unit, keyed by ``ctx.target_key``) instead of at every iteration.

    Args:
        loss_fn: ``loss_fn(fp_raw, q_raw) -> scalar`` (e.g. :class:`FGICLoss`).
        weight: factor of the term (the paper sums ``L_H + L_G``: 1).
    """

    needs_final_outputs = True

    def __init__(self, *, loss_fn: Callable[[Any, Any], Tensor], weight: float = 1.0) -> None:
        self.loss_fn = loss_fn
        self.weight = weight
        self.seconds = 0.0
        #: FGIC's filter tally over this term's calls (an :class:`FGICLoss` only)
        self.counts = FilterCounts()
        self._decoded: dict[Any, Any] = {}

    def __call__(self, ctx: ReconContext) -> Tensor:
        if ctx.final_pred is None or ctx.final_target is None:
            raise ValueError('GlobalLoss needs the final outputs (a TailRunner forward)')
        tic = time.perf_counter()
        reusable = ctx.target_key is not None and hasattr(self.loss_fn, 'loss_decoded')
        if reusable and ctx.decode_target is not None:   # decoded once per calibration
            value = self.loss_fn.loss_decoded(ctx.decode_target(self.loss_fn),
                                              ctx.final_pred, self.counts)
        elif reusable:
            if ctx.target_key not in self._decoded:
                self._decoded[ctx.target_key] = self.loss_fn.decode_target(ctx.final_target)
            value = self.loss_fn.loss_decoded(self._decoded[ctx.target_key], ctx.final_pred,
                                              self.counts)
        else:
            value = self.loss_fn(ctx.final_target, ctx.final_pred)
        self.seconds += time.perf_counter() - tic
        return self.weight * value

    def summary(self) -> str:
        """The filter's kept fraction over this term's calls (logged per unit)."""
        return self.counts.describe() if self.counts.total else ''
