"""Load a deployed work dir and detect objects in images (no torch, no mmdet).

``spec.json`` names the backend and its file: ``onnxruntime`` runs the end-to-end graph
(``dets`` + ``labels``); ``tvm_int4`` / ``tvm_relax`` run the TVM artifact of the raw head
outputs and then the NumPy post-processor of ``spec['postprocess']``
(``runtime/postprocess.py``: a dense head's or YOLOv5's), or a two-stage detector's two
artifacts with the NumPy steps of ``runtime/two_stage.py`` between and after them. Boxes
go back to the original image by undoing the resize (and a letterbox's padding, clipped to
the image, as ``YOLOv5Head`` does).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmdet_regptq.deploy.runtime.postprocess import make_post_processor, rescale_detections
from mmdet_regptq.deploy.runtime.preprocess import PreparedImage, Preprocess
from mmdet_regptq.deploy.runtime.two_stage import TwoStagePipeline, TwoStagePostProcessor

__all__ = ['Detections', 'Detector', 'ORT_BACKENDS', 'TVM_BACKENDS', 'tvm_end2end']

ORT_BACKENDS = ('onnxruntime',)
TVM_BACKENDS = ('tvm_int4', 'tvm_relax')


@dataclass
class Detections:
    """One image's detections in its original pixel coordinates."""

    boxes: np.ndarray    # [N, 4] x1, y1, x2, y2
    scores: np.ndarray   # [N]
    labels: np.ndarray   # [N] class indices

    def to_list(self, classes: list[str] | None = None) -> list[dict]:
        return [dict(bbox=[round(float(v), 2) for v in b], score=round(float(s), 4),
                     label=int(lab), **({'class': classes[int(lab)]} if classes else {}))
                for b, s, lab in zip(self.boxes, self.scores, self.labels)]


def _ort_backend(path: Path, threads: int) -> Callable[[np.ndarray], tuple]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dets, labels = session.run(['dets', 'labels'], {name: x})
        return dets[0], labels[0]
    return run


def tvm_end2end(work_dir: str | Path, spec: dict) -> Callable[[np.ndarray], tuple]:
    """Image tensor → ``(dets [N, 5], labels [N])`` of a TVM end-to-end work dir: the
    artifact of the raw head outputs + the NumPy post-processor, or for a two-stage
    detector (``postprocess.kind='two_stage'``) its two artifacts joined by the NumPy RPN /
    RoIAlign / box-head steps (``runtime/two_stage.py``)."""
    from mmdet_regptq.deploy.tvm.runner import TvmRunner

    work_dir = Path(work_dir)
    runner = TvmRunner(work_dir / spec['model'])
    stored = np.load(work_dir / spec['priors'])
    priors = [stored[f'priors{i}'] for i in range(len(stored.files))]
    name = runner.input_names[0]
    if spec['postprocess'].get('kind') == 'two_stage':
        if 'roi_model' not in spec:
            raise ValueError(f'{work_dir / "spec.json"}: a two-stage TVM deployment needs '
                             'roi_model (the RoI graph\'s artifact)')
        return TwoStagePipeline(TwoStagePostProcessor(spec['postprocess'], priors), runner,
                                TvmRunner(work_dir / spec['roi_model']), input_name=name)
    post = make_post_processor(spec['postprocess'], priors)
    return lambda x: post(runner({name: x}))


class Detector:
    """A deployed detector.

    Args:
        work_dir: the deploy work dir (``spec.json`` and the backend files).
        threads: ONNX Runtime intra-op threads (0 = its default).
    """

    def __init__(self, work_dir: str | Path, threads: int = 0) -> None:
        self.work_dir = Path(work_dir)
        spec_file = self.work_dir / 'spec.json'
        if not spec_file.exists():
            raise FileNotFoundError(f'{spec_file} not found: deploy with an end-to-end deploy '
                                    'config (codebase_config.model_type=\'end2end\')')
        self.spec: dict[str, Any] = json.loads(spec_file.read_text())
        self.preprocess = Preprocess(self.spec['preprocess'])
        self.classes = self.spec.get('classes')
        backend = self.spec['backend']
        if backend in ORT_BACKENDS:
            self.run = _ort_backend(self.work_dir / self.spec['model'], threads)
        elif backend in TVM_BACKENDS:
            self.run = tvm_end2end(self.work_dir, self.spec)
        else:
            raise ValueError(f'spec.json backend {backend!r}; allowed: '
                             f'{", ".join(ORT_BACKENDS + TVM_BACKENDS)}')

    def prepare(self, image: str | Path | np.ndarray) -> PreparedImage:
        img = self.preprocess.load(str(image)) if not isinstance(image, np.ndarray) else image
        return self.preprocess(img)

    def __call__(self, image: str | Path | np.ndarray) -> Detections:
        """Detections of an image file or a BGR ``uint8`` array ``[h, w, 3]``."""
        prepared = self.prepare(image)
        dets, labels = self.run(prepared.tensor)
        letterbox = self.preprocess.type == 'letterbox'
        dets = rescale_detections(np.asarray(dets, np.float32).reshape(-1, 5),
                                  prepared.scale_factor,
                                  pad=prepared.pad if letterbox else None,
                                  clip_shape=prepared.ori_shape if letterbox else None)
        return Detections(dets[:, :4], dets[:, 4], np.asarray(labels, np.int64).reshape(-1))
