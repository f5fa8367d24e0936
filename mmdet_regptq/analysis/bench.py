"""A detector on a fixed set of images: FP reference, predictions, decoded outputs, AP.

Every analysis command compares a modified detector (noisy weights, one quantized layer,
another weight scale, a quantized checkpoint) with the float one on the same images. The
bench loads the model and the images once, preprocesses the images once, and gives:

- :meth:`DetectorBench.outputs`: the raw outputs (the adapter's ``forward``: no NMS; fixed
  FP proposals for two-stage detectors), which the adapter decodes into per-prediction
  class scores and boxes aligned prediction by prediction between two states of the
  model; ``None`` when the adapter cannot decode;
- :meth:`DetectorBench.detections`: the detector's final detections (``model.predict``,
  NMS included, boxes in original-image pixels);
- :meth:`DetectorBench.evaluate`: COCO AP of detections with mmdet's own ``CocoMetric``
  restricted to the bench's images.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from mmengine.config import Config
from mmengine.dataset import Compose, pseudo_collate
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope
from torch import Tensor, nn

from mmdet_regptq.models.adapters import DetectorAdapter, RawOutputs, find_adapter

__all__ = ['Detections', 'Snapshot', 'DetectorBench', 'load_detector']

logger = logging.getLogger(__name__)


@dataclass
class Detections:
    """Final detections of one image (after NMS), in original-image pixels.

    Attributes:
        bboxes: ``[M, 4]`` (x1, y1, x2, y2).
        scores: ``[M]``.
        labels: ``[M]`` class indices.
        img_id: the dataset's image id (the index for images given as files).
        img_path: the image file.
        ori_shape: ``(height, width)`` of the original image.
    """
    bboxes: Tensor
    scores: Tensor
    labels: Tensor
    img_id: int
    img_path: str
    ori_shape: tuple[int, int]


@dataclass
class Snapshot:
    """What one state of the model produces on the bench's images.

    Attributes:
        outputs: the adapter's raw outputs per batch, or None (the adapter cannot decode).
        detections: per-image final detections.
        ap: COCO metrics (``mAP``, ``mAP_50``, ``mAP_75``) or None when not evaluated.
    """
    outputs: list[RawOutputs] | None
    detections: list[Detections]
    ap: dict[str, float] | None


def load_detector(config: str | Path | Config, checkpoint: str | Path | None, *,
                  device: str = 'cpu', cfg_options: dict | None = None) -> tuple[Config, nn.Module]:
    """Build the detector of an mmdet config and load a checkpoint.

    Args:
        config: config file or loaded ``Config``.
        checkpoint: weights file; ``None`` keeps the random initialisation (smoke tests
            only: every number is then meaningless), with a warning.
        device: where the model runs.
        cfg_options: ``--cfg-options`` style overrides merged into the config.

    Returns:
        ``(cfg, model)`` with the model in eval mode.
    """
    import mmdet_regptq  # noqa: F401  (torch >= 2.6 loading fixes, registries)
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.runner import load_checkpoint

    cfg = config if isinstance(config, Config) else Config.fromfile(str(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    register_all_modules(init_default_scope=False)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    if checkpoint is None:
        logger.warning('no checkpoint: the detector keeps its random initialisation')
    else:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f'checkpoint={str(checkpoint)!r} does not exist')
        ckpt = load_checkpoint(model, str(checkpoint), map_location='cpu', strict=True,
                               logger='silent')
        meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
        if meta.get('dataset_meta'):
            model.dataset_meta = meta['dataset_meta']
    model.cfg = cfg
    return cfg, model.to(device).eval()


class DetectorBench:
    """A detector and a fixed list of preprocessed images.

    Args:
        cfg: the detector's config (test pipeline, test evaluator).
        model: the detector, weights loaded (unwrapped).
        batches: raw batches as an mmdet dataloader yields them (``inputs``,
            ``data_samples``); kept (``raw_batches``) and preprocessed once (``batches``).
        evaluator: a ``CocoMetric`` config for :meth:`evaluate`, or None (no AP).
        dataset_meta: ``classes`` / ``palette`` (model's, or the dataset's).
    """

    def __init__(self, cfg: Config, model: nn.Module, batches: Sequence[dict], *,
                 evaluator: dict | None = None, dataset_meta: dict | None = None) -> None:
        self.cfg = cfg
        self.model = model.eval()
        self.adapter: DetectorAdapter = find_adapter(model)
        self.raw_batches = list(batches)
        self.batches = [self.adapter.prepare_batch(b) for b in batches]
        if not self.batches:
            raise ValueError('DetectorBench: no images')
        self.evaluator = evaluator
        self.dataset_meta = dataset_meta or getattr(model, 'dataset_meta', None) or {}
        self.img_ids = [int(s.img_id) for b in self.batches for s in b['data_samples']]
        self._has_decode: bool | None = None

    # --- construction ----------------------------------------------------------------
    def with_model(self, model: nn.Module) -> 'DetectorBench':
        """The same images and evaluator with another model (e.g. a quantized copy)."""
        bench = object.__new__(DetectorBench)
        bench.__dict__.update(self.__dict__)
        bench.model = model.eval()
        bench.adapter = find_adapter(model)
        bench._has_decode = None
        return bench

    @classmethod
    def from_val_set(cls, cfg: Config, model: nn.Module, *, num_images: int,
                     batch_size: int = 4, with_ap: bool = True) -> 'DetectorBench':
        """The first ``num_images`` images of the config's test (else val) dataset."""
        loader_cfg = cfg.get('test_dataloader') or cfg.get('val_dataloader')
        if loader_cfg is None:
            raise ValueError('the config has no test_dataloader / val_dataloader')
        dataset = _build_dataset(cfg, loader_cfg['dataset'])
        if not 1 <= num_images <= len(dataset):
            raise ValueError(f'num_images={num_images} is out of range; allowed '
                             f'1..{len(dataset)} (the test dataset)')
        items = [dataset[i] for i in range(num_images)]
        batches = [pseudo_collate(items[i:i + batch_size])
                   for i in range(0, num_images, batch_size)]
        evaluator = _coco_evaluator(cfg) if with_ap else None
        meta = getattr(model, 'dataset_meta', None) or dict(dataset.metainfo)
        return cls(cfg, model, batches, evaluator=evaluator, dataset_meta=meta)

    @classmethod
    def from_files(cls, cfg: Config, model: nn.Module, paths: Sequence[str | Path], *,
                   batch_size: int = 4) -> 'DetectorBench':
        """Image files passed through the config's test pipeline (no annotations, no AP)."""
        from mmdet.utils import get_test_pipeline_cfg

        pipeline = Compose(get_test_pipeline_cfg(cfg.copy()))
        items = []
        for i, path in enumerate(paths):
            if not Path(path).is_file():
                raise FileNotFoundError(f'image {str(path)!r} does not exist')
            items.append(pipeline(dict(img_path=str(path), img_id=i)))
        batches = [pseudo_collate(items[i:i + batch_size])
                   for i in range(0, len(items), batch_size)]
        return cls(cfg, model, batches)

    # --- running ---------------------------------------------------------------------
    @torch.no_grad()
    def outputs(self) -> list[RawOutputs] | None:
        """Raw outputs per batch (None when the adapter cannot decode them)."""
        if self._has_decode is False:
            return None
        out = [self.adapter.forward(self.model, batch) for batch in self.batches]
        if self._has_decode is None:
            try:
                self.adapter.decode_stages(out[0])
                self._has_decode = True
            except NotImplementedError as err:
                logger.warning(f'{type(self.model).__name__}: no per-prediction outputs '
                               f'({err}); only final detections are compared')
                self._has_decode = False
                return None
        return out

    @torch.no_grad()
    def detections(self) -> list[Detections]:
        """Final detections (``model.predict``, rescaled to the original images)."""
        out = []
        for batch in self.batches:
            samples = self.model.predict(batch['inputs'], batch['data_samples'], rescale=True)
            for s in samples:
                pred = s.pred_instances
                out.append(Detections(pred.bboxes.float().cpu(), pred.scores.float().cpu(),
                                      pred.labels.cpu(), int(s.img_id), str(s.img_path),
                                      tuple(int(v) for v in s.ori_shape)))
        return out

    def evaluate(self, detections: Sequence[Detections]) -> dict[str, float]:
        """COCO bbox AP (``mAP``, ``mAP_50``, ``mAP_75``) on the bench's images only."""
        if self.evaluator is None:
            raise RuntimeError('this bench has no evaluator (built without AP)')
        from mmdet.registry import METRICS

        if sum(len(d.scores) for d in detections) == 0:
            return {'mAP': 0.0, 'mAP_50': 0.0, 'mAP_75': 0.0}
        mm_logger = MMLogger.get_current_instance()
        level = mm_logger.level
        mm_logger.setLevel(logging.ERROR)
        try:  # pycocotools prints its progress; keep the command's output to the tables
            with contextlib.redirect_stdout(io.StringIO()):
                metric = METRICS.build(dict(self.evaluator))
                metric.dataset_meta = self.dataset_meta
                metric.img_ids = list(self.img_ids)  # the subset, not the whole ann file
                for det in detections:
                    metric.process({}, [dict(
                        img_id=det.img_id, ori_shape=det.ori_shape,
                        pred_instances=dict(bboxes=det.bboxes, scores=det.scores,
                                            labels=det.labels))])
                res = metric.evaluate(len(detections))
        finally:
            mm_logger.setLevel(level)
        return {k: float(res[f'coco/bbox_{k}']) for k in ('mAP', 'mAP_50', 'mAP_75')}

    def snapshot(self, *, with_ap: bool) -> Snapshot:
        """Outputs, detections and (optionally) AP of the model in its current state."""
        dets = self.detections()
        return Snapshot(self.outputs(), dets, self.evaluate(dets) if with_ap else None)

    @property
    def num_images(self) -> int:
        return len(self.img_ids)


def _build_dataset(cfg: Config, dataset_cfg: Any) -> Any:
    from mmdet.registry import DATASETS

    with DATASETS.switch_scope_and_registry(cfg.get('default_scope', 'mmdet')) as registry:
        return registry.build(dataset_cfg)


def _coco_evaluator(cfg: Config) -> dict:
    """The config's ``CocoMetric`` (test evaluator, else val evaluator) with an ann file."""
    evaluator = cfg.get('test_evaluator') or cfg.get('val_evaluator')
    candidates = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    for ev in candidates:
        if ev is not None and str(ev.get('type', '')).split('.')[-1] == 'CocoMetric':
            if not ev.get('ann_file'):
                raise ValueError('AP needs the CocoMetric of the config to have an ann_file')
            ev = dict(ev)
            ev.update(metric='bbox', format_only=False, outfile_prefix=None)
            ev.pop('classwise', None)
            return ev
    raise ValueError(f'AP needs a CocoMetric test/val evaluator; the config has {evaluator!r}')
