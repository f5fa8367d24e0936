"""Helpers of the engine tests: the bundled synthetic RetinaNet (random init, no
download) at 96x96 and a fast calibration setting (min/max scales, 2 iterations)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RETINANET_CFG = REPO / 'configs' / 'synthetic' / 'retinanet_r18-16_fpn64_synthetic.py'
SIZE = 96

#: W4A4 with min/max scale estimation: the default 'lp' search is the slow part on CPU and
#: is not what these tests are about.
FAST_QUANT = dict(w_bits=4, a_bits=4,
                  weight=dict(type='Uniform', per_channel=True, scale_method='minmax'),
                  act=dict(type='Uniform', scale_method='minmax'))
FAST_METHOD = dict(type='QDrop', iters=2, progress=False, log_interval=0)


def small_cfg(path: Path = RETINANET_CFG, size: int = SIZE):
    """A config with every Resize of its pipelines set to ``size`` x ``size`` and no score
    threshold (a random-init detector then still predicts boxes)."""
    import mmdet_regptq  # noqa: F401  (registers the hook; applies compat)
    from mmengine.config import Config
    cfg = Config.fromfile(str(path))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = cfg[loader]['dataset']
        for step in dataset.get('pipeline', []):
            if step['type'] == 'Resize':
                step['scale'] = (size, size)
    test_cfg = cfg.model.test_cfg
    (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).score_thr = 0.0  # random init: keep boxes
    return cfg


def build_detector(cfg, seed: int = 0):
    """The config's detector with seeded random init, in eval mode."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    torch.manual_seed(seed)
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.init_weights()
    return model.eval()


def calib_batches(cfg, num_images: int = 2, batch_size: int = 2) -> list:
    """The calibration loader's batches (materialised: reusable across runs)."""
    from mmdet_regptq.engine import build_calib_loader
    return list(build_calib_loader(cfg, num_images=num_images, batch_size=batch_size))


def predict(model, batch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(bboxes, scores, labels)`` per image."""
    with torch.no_grad():
        out = model.test_step(batch)
    return [(o.pred_instances.bboxes, o.pred_instances.scores, o.pred_instances.labels)
            for o in out]


def state_equal(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (or exist on one side only)."""
    diff = sorted(set(a) ^ set(b))
    diff += [k for k in a if k in b and not torch.equal(a[k], b[k])]
    return diff
