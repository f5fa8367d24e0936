"""``spec.json`` of a deployed work dir: what the torch-free runtime needs besides the
backend file(s) — preprocessing (from the model config's test pipeline and data
preprocessor), class names, and for a graph that stops at the raw head outputs the dense
head's post-processing settings (its priors go to ``priors.npz``)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

__all__ = ['preprocess_spec', 'dense_postprocess_spec', 'write_spec', 'SPEC_FILE',
           'PRIORS_FILE']

SPEC_FILE = 'spec.json'
PRIORS_FILE = 'priors.npz'


def preprocess_spec(model_cfg: Any, input_shape: Sequence[int]) -> dict:
    """``Resize`` of the test pipeline + ``data_preprocessor`` → the runtime's keys."""
    pipeline = model_cfg.get('test_pipeline') or model_cfg.test_dataloader.dataset.pipeline
    resize = [t for t in pipeline if t.get('type') in ('Resize', 'mmdet.Resize')]
    if len(resize) != 1 or 'scale' not in resize[0]:
        raise ValueError('the test pipeline needs exactly one Resize with a scale for the '
                         f'runtime, found {resize}')
    pre = model_cfg.model.data_preprocessor
    scale = resize[0]['scale']
    scale = [scale, scale] if isinstance(scale, int) else list(scale)
    return dict(scale=scale, keep_ratio=bool(resize[0].get('keep_ratio', False)),
                mean=list(pre.get('mean', [0, 0, 0])), std=list(pre.get('std', [1, 1, 1])),
                bgr_to_rgb=bool(pre.get('bgr_to_rgb', pre.get('rgb_to_bgr', False))),
                input_shape=[int(v) for v in input_shape])


def dense_postprocess_spec(detector: nn.Module, input_shape: Sequence[int]
                           ) -> tuple[dict, list[np.ndarray]]:
    """Post-processing settings and priors of a dense head for ``DensePostProcessor``."""
    from mmdet_regptq.deploy.detectors.end2end import DenseEnd2End

    graph = DenseEnd2End(detector, input_shape)     # checks the head, makes the priors
    head = detector.bbox_head
    coder = head.bbox_coder
    coder_spec = dict(type=type(coder).__name__, clip_border=bool(coder.clip_border))
    if coder_spec['type'] == 'DeltaXYWHBBoxCoder':
        coder_spec.update(means=list(coder.means), stds=list(coder.stds),
                          add_ctr_clamp=bool(coder.add_ctr_clamp),
                          ctr_clamp=float(coder.ctr_clamp), wh_ratio_clip=16 / 1000)
    cfg = {k: v for k, v in dict(head.test_cfg).items()
           if k in ('nms_pre', 'score_thr', 'min_bbox_size', 'max_per_img')}
    cfg['nms'] = dict(iou_threshold=float(head.test_cfg['nms']['iou_threshold']))
    spec = dict(kind='dense', num_classes=int(head.num_classes),
                cls_out_channels=int(head.cls_out_channels),
                use_sigmoid=bool(head.use_sigmoid_cls),
                encode_size=int(coder.encode_size), coder=coder_spec,
                score_factors=graph.with_score_factors, test_cfg=cfg,
                input_shape=[int(v) for v in input_shape])
    priors = [getattr(graph, f'priors{i}').numpy() for i in range(graph.num_levels)]
    return spec, priors


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_spec(work_dir: str | Path, spec: dict, priors: Sequence[np.ndarray] | None = None
               ) -> list[str]:
    """Write ``spec.json`` (and ``priors.npz``) atomically; returns the paths."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    files = [work_dir / SPEC_FILE]
    _atomic_write(files[0], lambda p: Path(p).write_text(json.dumps(spec, indent=1)))
    if priors is not None:
        files.append(work_dir / PRIORS_FILE)

        def save(p: str) -> None:
            with open(p, 'wb') as f:
                np.savez(f, **{f'priors{i}': a for i, a in enumerate(priors)})
        _atomic_write(files[1], save)
    return [str(f) for f in files]

