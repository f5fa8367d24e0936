"""Read bbox AP from the metrics dict of ``Runner.test()``.

mmdet's ``CocoMetric`` returns no ``coco/bbox_*`` keys when the model predicts no box on
any test image (it logs "The testing results of the whole dataset is empty"). A quantized
detector that has collapsed does exactly that; its AP is 0, not a crash of the benchmark.
"""
from __future__ import annotations

from typing import Mapping

BBOX_KEYS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75')


def bbox_metrics(metrics: Mapping[str, float], prefix: str = 'coco/') -> dict[str, float]:
    """``{'bbox_mAP': ..., 'bbox_mAP_50': ..., 'bbox_mAP_75': ...}``; all 0.0 when the
    evaluator got no detection at all (no ``bbox`` key in ``metrics``).

    Raises:
        KeyError: some but not all of the keys are present (another metric's dict).
    """
    found = {k: metrics[prefix + k] for k in BBOX_KEYS if prefix + k in metrics}
    if not found and not any(k.startswith(prefix + 'bbox') for k in metrics):
        return dict.fromkeys(BBOX_KEYS, 0.0)
    missing = [prefix + k for k in BBOX_KEYS if k not in found]
    if missing:
        raise KeyError(f'metrics lack {missing}; got {sorted(metrics)}')
    return found
