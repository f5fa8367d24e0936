"""FP vs quantized detections side by side (like the paper's Figure S2), drawn with mmdet's
own ``DetLocalVisualizer``, with per-image counts of missed / extra / shifted boxes.

Counts (:func:`metrics.match_detections` on the drawn detections, score >= ``score_thr``
on both sides): a quantized box matches an FP one of the same class with IoU >= ``match_iou``;
``missed`` FP detections have no match, ``extra`` quantized ones have none, ``shifted``
matches have IoU < ``shift_iou``, ``relabeled`` missed ones are covered by a box of
another class.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mmcv
import numpy as np
import torch
from torch import nn

from mmdet_regptq.analysis.bench import DetectorBench, Detections
from mmdet_regptq.analysis.metrics import ProxyConfig, match_detections
from mmdet_regptq.analysis.report import Table, new_figure, save_figure

__all__ = ['CompareConfig', 'CompareResult', 'load_quantized_detector', 'run_compare',
           'draw_detections']

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareConfig:
    """Args:
        score_thr: detections drawn and counted (0..1).
        match_iou: IoU for a quantized box to match an FP box of its class.
        shift_iou: matched boxes below this IoU count as shifted.
        grid_images: images in the combined ``compare_grid.png`` (>= 1).
        label: name of the quantized model in titles (default: from the checkpoint meta).
    """
    score_thr: float = 0.3
    match_iou: float = 0.5
    shift_iou: float = 0.8
    grid_images: int = 6
    label: str | None = None

    def __post_init__(self) -> None:
        ProxyConfig(score_thr=self.score_thr, match_iou=self.match_iou, shift_iou=self.shift_iou)
        if self.grid_images < 1:
            raise ValueError(f'grid_images={self.grid_images} must be >= 1')

    @property
    def proxy(self) -> ProxyConfig:
        return ProxyConfig(score_thr=self.score_thr, match_iou=self.match_iou,
                           shift_iou=self.shift_iou)


@dataclass
class CompareResult:
    table: Table
    totals: dict[str, int]
    files: list[Path] = field(default_factory=list)


def load_quantized_detector(bench: DetectorBench, path: str | Path) -> tuple[nn.Module, dict]:
    """A copy of the bench's float model, quantized as ``path`` says and loaded from it.

    The checkpoint's meta names the policy (``quant``) and the method it was made with;
    the structure is rebuilt by ``quantize_detector`` exactly as the hook does with
    ``quantized_checkpoint=``.
    """
    from mmdet_regptq.engine import quantize_detector

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'quantized checkpoint {str(path)!r} does not exist')
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    if not meta or 'quant' not in meta or 'method' not in meta:
        raise ValueError(f'{str(path)!r} is not a quantized checkpoint of mmdet_regptq '
                         "(its meta needs 'quant' and 'method')")
    model = copy.deepcopy(bench.model)
    quantize_detector(model, bench.raw_batches[:1], quant=dict(meta['quant']),
                      method=dict(type=meta['method']), quantized_checkpoint=str(path))
    return model.eval(), meta


def _visualizer(meta: dict) -> Any:
    from mmdet.visualization import DetLocalVisualizer

    vis = DetLocalVisualizer(name=f'regptq_compare_{id(meta)}_{np.random.randint(1 << 30)}')
    vis.dataset_meta = meta
    return vis


def draw_detections(vis: Any, image: np.ndarray, det: Detections, score_thr: float,
                    min_side: int = 480) -> np.ndarray:
    """The RGB image with the detections drawn by mmdet's visualizer.

    Small images are first enlarged to ``min_side`` pixels (boxes with them), so that the
    visualizer's labels, sized for typical photos, stay readable.
    """
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    factor = max(1.0, min_side / min(image.shape[:2]))
    if factor > 1:
        image = mmcv.imrescale(image, factor, interpolation='nearest')
    sample = DetDataSample()
    sample.pred_instances = InstanceData(bboxes=det.bboxes * factor, scores=det.scores,
                                         labels=det.labels)
    vis.add_datasample('compare', image, data_sample=sample, draw_gt=False, show=False,
                       pred_score_thr=score_thr)
    return vis.get_image()


def run_compare(fp_bench: DetectorBench, q_bench: DetectorBench, cfg: CompareConfig,
                out_dir: str | Path) -> CompareResult:
    """One side-by-side PNG per image, a grid of the first ones, and the counts table."""
    out_dir = Path(out_dir)
    fp_dets, q_dets = fp_bench.detections(), q_bench.detections()
    label = cfg.label or 'quantized'
    columns = ['image', 'fp_dets', 'q_dets', 'missed', 'extra', 'shifted', 'relabeled',
               'mean_iou', 'box_l1']
    table = Table(columns, title=f'FP vs {label}: detections with score >= {cfg.score_thr}')
    vis = _visualizer(fp_bench.dataset_meta)
    panels = []
    for ref, cur in zip(fp_dets, q_dets):
        diff = match_detections(ref, cur, cfg.proxy, displayed=True)
        matched = diff.matched
        row = dict(image=Path(ref.img_path).name, fp_dets=diff.num_ref, q_dets=diff.num_cur,
                   missed=diff.missed, extra=diff.extra, shifted=diff.shifted,
                   relabeled=diff.relabeled,
                   mean_iou=float(diff.iou[matched].mean()) if matched.any() else None,
                   box_l1=float(diff.box_err[matched].mean()) if matched.any() else None)
        table.add(**row)
        image = mmcv.imconvert(mmcv.imread(ref.img_path), 'bgr', 'rgb')
        pair = (draw_detections(vis, image, ref, cfg.score_thr),
                draw_detections(vis, image, cur, cfg.score_thr))
        panels.append((row, pair))
    totals = {k: sum(r[k] for r in table.rows) for k in
              ('fp_dets', 'q_dets', 'missed', 'extra', 'shifted', 'relabeled')}
    table.add(image='TOTAL', **totals)
    files = [table.to_csv(out_dir / 'compare.csv')]
    for row, pair in panels:
        files.append(_plot_pairs([(row, pair)], out_dir / 'images' /
                                 f'{Path(row["image"]).stem}.png', label))
    files.append(_plot_pairs(panels[:cfg.grid_images], out_dir / 'compare_grid.png', label))
    return CompareResult(table, totals, files)


def _plot_pairs(panels: list, path: Path, label: str) -> Path:
    fig, axes = new_figure(2, len(panels), size=(4.5, 4.9))  # ~ the drawn size: no resampling
    for (row, (fp_img, q_img)), ax_row in zip(panels, axes):
        ax_row[0].imshow(fp_img)
        ax_row[0].set_title(f'{row["image"]}  FP: {row["fp_dets"]} boxes', fontsize=9)
        ax_row[1].imshow(q_img)
        ax_row[1].set_title(f'{label}: {row["q_dets"]} boxes\nmissed {row["missed"]}, extra '
                            f'{row["extra"]}, shifted {row["shifted"]}', fontsize=9)
        for ax in ax_row:
            ax.set_axis_off()
    return save_figure(fig, path)
