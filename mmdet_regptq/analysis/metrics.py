"""How far a modified detector's predictions are from the float detector's.

Two families of measures, both against the FP model on the same images:

``out_*`` - per prediction, before NMS (the adapter's ``decode_stages``; aligned index by
index; two-stage detectors: RoI head on the FP model's proposals):
    ``out_cls``  mean |score change| of the FP top foreground class, over the final-stage
                 predictions whose FP top score is >= ``score_thr``;
    ``out_box``  mean L1 of the decoded boxes over the same predictions (class-specific
                 boxes at the FP top class), each coordinate divided by the input image's
                 width / height;
    ``<stage>_cls``, ``<stage>_box``  the same for the earlier stages (``rpn_*``);
    ``out_gl``   the paper's global loss L_G, computed by the adapter's FGIC loss
                 (:mod:`mmdet_regptq.calib.fgic`; summed over stages, FP entropy
                 subtracted so the FP model reads 0).
``det_*`` - after NMS, on the final detections (any detector, boxes of the original image):
    each FP detection is matched greedily (in FP score order) to the unmatched modified
    detection of the same class with the largest IoU >= ``match_iou``. Over the FP
    detections with score >= ``score_thr``:
    ``det_cls``  mean |score change| (a missed detection counts its full FP score);
    ``det_box``  mean normalised L1 over the matched ones;
    ``det_miss`` fraction not matched; ``det_gl`` = mean(|score change| + lam x L1 x matched).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from mmdet_regptq.analysis.bench import Detections, Snapshot
from mmdet_regptq.calib.fgic import DetPredictions, FGICConfig
from mmdet_regptq.models.adapters import DetectorAdapter, RawOutputs

__all__ = ['ProxyConfig', 'ImageDiff', 'output_errors', 'match_detections', 'detection_errors',
           'compare_snapshots', 'box_iou']


@dataclass(frozen=True)
class ProxyConfig:
    """Thresholds of the FP-vs-modified measures.

    Args:
        score_thr: FP score above which a prediction / detection counts (0..1).
        theta_c: FGIC's confidence filter of the global loss (paper: 2e-4).
        theta_i: FGIC's IoU filter of the box term (paper: 0.1).
        lam: weight of the box term (project default 1.0).
        match_iou: IoU for a modified detection to match an FP detection of its class.
        shift_iou: a matched detection with IoU below this counts as shifted.
    """
    score_thr: float = 0.3
    theta_c: float = 2e-4
    theta_i: float = 0.1
    lam: float = 1.0
    match_iou: float = 0.5
    shift_iou: float = 0.8

    def __post_init__(self) -> None:
        for name in ('score_thr', 'theta_c', 'theta_i', 'match_iou', 'shift_iou'):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f'{name}={value} is out of range; allowed 0..1')
        if self.lam < 0:
            raise ValueError(f'lam={self.lam} must be >= 0')


def box_iou(a: Tensor, b: Tensor, *, aligned: bool = False) -> Tensor:
    """IoU of ``[N, 4]`` and ``[M, 4]`` xyxy boxes: ``[N, M]``, or ``[N]`` when aligned."""
    from mmdet.structures.bbox import bbox_overlaps
    return bbox_overlaps(a, b, is_aligned=aligned)


def _norm_l1(a: Tensor, b: Tensor, shape: tuple[int, int] | None) -> Tensor:
    """Per box mean |a - b| over the 4 coordinates, x by width and y by height: ``[N]``."""
    if shape is None:
        raise ValueError('boxes cannot be normalised: the predictions carry no img_shape')
    h, w = shape
    scale = a.new_tensor([w, h, w, h])
    return ((a - b).abs() / scale).mean(-1)


def _mean(values: list[Tensor]) -> float:
    values = [v for v in values if v.numel()]
    if not values:
        return math.nan
    return float(torch.cat(values).float().mean())


def output_errors(adapter: DetectorAdapter, ref: Sequence[RawOutputs],
                  cur: Sequence[RawOutputs], cfg: ProxyConfig) -> dict[str, float]:
    """``out_cls``, ``out_box``, ``<stage>_cls/_box``, ``out_gl`` (module docstring).

    Args:
        adapter: the detector's adapter (decoding and FGIC loss).
        ref: FP raw outputs per batch.
        cur: modified raw outputs of the same batches.
        cfg: thresholds.
    """
    if len(ref) != len(cur):
        raise ValueError(f'{len(ref)} FP batches vs {len(cur)} modified batches')
    fgic = adapter.global_loss(FGICConfig(lambda_=cfg.lam, theta_c=cfg.theta_c,
                                          theta_i=cfg.theta_i))
    cls_err: dict[str, list[Tensor]] = {}
    box_err: dict[str, list[Tensor]] = {}
    gl, num = 0.0, 0
    for r_raw, c_raw in zip(ref, cur):
        r_stages, c_stages = adapter.decode_stages(r_raw), adapter.decode_stages(c_raw)
        n = len(next(iter(r_stages.values())))
        gl += float(fgic(r_raw, c_raw)) * n
        num += n
        for stage, r_preds in r_stages.items():
            for r, c in zip(r_preds, c_stages[stage]):
                top, idx = _foreground(r).max(-1)
                keep = top >= cfg.score_thr
                now = _foreground(c).gather(-1, idx[:, None])[:, 0]
                cls_err.setdefault(stage, []).append((now - top).abs()[keep].float().cpu())
                l1 = _norm_l1(_top_boxes(c, idx), _top_boxes(r, idx), r.img_shape)
                box_err.setdefault(stage, []).append(l1[keep].float().cpu())
    out = {}
    final = adapter.final_stage
    for stage in sorted(cls_err, key=lambda s: s != final):
        prefix = 'out' if stage == final else stage
        out[f'{prefix}_cls'] = _mean(cls_err[stage])
        out[f'{prefix}_box'] = _mean(box_err[stage])
    out['out_gl'] = gl / max(num, 1)
    return out


def _foreground(preds: DetPredictions) -> Tensor:
    """``[N, K]`` foreground scores (a softmax's last, background column left out)."""
    return preds.scores if preds.sigmoid else preds.scores[:, :-1]


def _top_boxes(preds: DetPredictions, idx: Tensor) -> Tensor:
    """``[N, 4]``: class-specific ``[N, K, 4]`` boxes at class ``idx``."""
    if preds.boxes.dim() == 2:
        return preds.boxes
    return preds.boxes.gather(1, idx.view(-1, 1, 1).expand(-1, 1, 4))[:, 0]


@dataclass
class ImageDiff:
    """FP vs modified detections of one image.

    Attributes:
        num_ref: FP detections with score >= score_thr.
        num_cur: modified detections with score >= score_thr.
        missed: FP detections (>= thr) without a match.
        extra: modified detections (>= thr) without a match.
        shifted: matched FP detections (>= thr) whose IoU < shift_iou.
        relabeled: missed FP detections overlapped (IoU >= match_iou) by another class.
        matched: ``[num_ref]`` bool, per FP detection (>= thr, FP score order of the input).
        score_err: ``[num_ref]`` |score change| (the full FP score when missed).
        box_err: ``[num_ref]`` normalised L1 to the match (0 when missed).
        iou: ``[num_ref]`` IoU with the match (0 when missed).
    """
    num_ref: int
    num_cur: int
    missed: int
    extra: int
    shifted: int
    relabeled: int
    matched: Tensor
    score_err: Tensor
    box_err: Tensor
    iou: Tensor


def _above(det: Detections, thr: float) -> Detections:
    keep = det.scores >= thr
    return replace(det, bboxes=det.bboxes[keep], scores=det.scores[keep], labels=det.labels[keep])


def match_detections(ref: Detections, cur: Detections, cfg: ProxyConfig, *,
                     displayed: bool = False) -> ImageDiff:
    """Greedy same-class matching of the modified detections to the FP ones.

    Args:
        ref: FP detections of one image.
        cur: modified detections of the same image.
        cfg: thresholds.
        displayed: match only detections with score >= ``score_thr`` on both sides (what
            a picture drawn at that threshold shows: matched + missed = FP boxes, matched
            + extra = quantized boxes). Default: every detection can match, so a detection
            whose score fell below the threshold counts as a score change, not a miss.
    """
    if displayed:
        ref, cur = _above(ref, cfg.score_thr), _above(cur, cfg.score_thr)
    n, m = len(ref.scores), len(cur.scores)
    iou = box_iou(ref.bboxes, cur.bboxes) if n and m else torch.zeros(n, m)
    same = ref.labels[:, None] == cur.labels[None, :]
    cand = torch.where(same & (iou >= cfg.match_iou), iou, torch.full_like(iou, -1.0))
    match = torch.full((n,), -1, dtype=torch.long)
    used = torch.zeros(m, dtype=torch.bool)
    if m:
        for i in torch.argsort(ref.scores, descending=True).tolist():
            row = cand[i].masked_fill(used, -1.0)
            if row.max() >= 0:
                match[i] = int(row.argmax())
                used[match[i]] = True
    has = match >= 0
    safe = match.clamp(min=0)
    cur_scores = torch.where(has, cur.scores[safe], torch.zeros(n)) if m else torch.zeros(n)
    pair_iou = torch.where(has, iou[torch.arange(n), safe], torch.zeros(n)) if m else torch.zeros(n)
    l1 = _norm_l1(cur.bboxes[safe], ref.bboxes, ref.ori_shape) if m else torch.zeros(n)
    l1 = torch.where(has, l1, torch.zeros(n))
    keep = ref.scores >= cfg.score_thr
    missed = keep & ~has
    other_class = (iou >= cfg.match_iou).any(1) if m else torch.zeros(n, dtype=torch.bool)
    return ImageDiff(
        num_ref=int(keep.sum()), num_cur=int((cur.scores >= cfg.score_thr).sum()),
        missed=int(missed.sum()), extra=int((~used & (cur.scores >= cfg.score_thr)).sum()),
        shifted=int((keep & has & (pair_iou < cfg.shift_iou)).sum()),
        relabeled=int((missed & other_class).sum()), matched=has[keep],
        score_err=(cur_scores - ref.scores).abs()[keep], box_err=l1[keep], iou=pair_iou[keep])


def detection_errors(ref: Sequence[Detections], cur: Sequence[Detections],
                     cfg: ProxyConfig) -> dict[str, float]:
    """``det_cls``, ``det_box``, ``det_miss``, ``det_gl`` over all images."""
    diffs = [match_detections(r, c, cfg) for r, c in zip(ref, cur)]
    num_ref = sum(d.num_ref for d in diffs)
    return {'det_cls': _mean([d.score_err for d in diffs]),
            'det_box': _mean([d.box_err[d.matched] for d in diffs]),
            'det_miss': sum(d.missed for d in diffs) / num_ref if num_ref else math.nan,
            'det_gl': _mean([d.score_err + cfg.lam * d.box_err for d in diffs])}


def compare_snapshots(ref: Snapshot, cur: Snapshot, cfg: ProxyConfig, *,
                      adapter: DetectorAdapter | None = None) -> dict[str, float]:
    """All measures of ``cur`` against ``ref`` (plus its AP when evaluated), in display order.

    ``out_*`` need the adapter and both snapshots' raw outputs; they are left out otherwise.
    """
    out: dict[str, float] = {}
    if adapter is not None and ref.outputs is not None and cur.outputs is not None:
        out.update(output_errors(adapter, ref.outputs, cur.outputs, cfg))
    out.update(detection_errors(ref.detections, cur.detections, cfg))
    if cur.ap is not None:
        out.update(cur.ap)
    return out
