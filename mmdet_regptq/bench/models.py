"""The models the benchmarks build: the bundled synthetic detectors (configs and trained
checkpoints of this checkout) and RetinaNet R50-FPN from mmdet's zoo config, with the
quantization presets the deployment rows use."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ['REPO_ROOT', 'SYNTHETIC_ROOT', 'SYNTHETIC_DETECTORS', 'BUNDLED', 'CHECKPOINTS',
           'W4A4', 'W8A8', 'model_config', 'data_samples']

#: the checkout this package runs from (``pip install -e .``): configs, checkpoints, data
REPO_ROOT = Path(__file__).resolve().parents[2]
#: the seeded synthetic COCO set (``python -m mmdet_regptq.datasets.synthetic``)
SYNTHETIC_ROOT = REPO_ROOT / 'data' / 'synthetic'

#: detector name -> config / checkpoint stem (``configs/synthetic/<stem>.py``,
#: ``checkpoints/<stem>.pth``)
SYNTHETIC_DETECTORS = {
    'retinanet': 'retinanet_r18-16_fpn64_synthetic',
    'fcos': 'fcos_r18-16_fpn64_synthetic',
    'faster-rcnn': 'faster-rcnn_r18-16_fpn64_synthetic',
}
#: the deployment benchmarks' short names -> config path (relative to the checkout)
BUNDLED = {short: f'configs/synthetic/{SYNTHETIC_DETECTORS[name]}.py'
           for short, name in (('retinanet', 'retinanet'), ('fcos', 'fcos'),
                               ('frcnn', 'faster-rcnn'))}
#: short name -> the trained checkpoint
CHECKPOINTS = {short: REPO_ROOT / 'checkpoints' / (Path(cfg).stem + '.pth')
               for short, cfg in BUNDLED.items()}

#: W4A4 with every layer quantized (the ``tvm_int4`` rows)
W4A4 = dict(w_bits=4, a_bits=4, quantize_final=True)
#: W8A8 as ONNX Runtime's integer kernels want it: symmetric per-channel weights
W8A8 = dict(w_bits=8, a_bits=8, quantize_final=True,
            weight=dict(type='Uniform', per_channel=True, symmetric=True, scale_method='minmax'),
            act=dict(type='Uniform', per_channel=False, symmetric=False, scale_method='minmax'))


def model_config(name: str) -> Any:
    """The mmengine ``Config`` of ``r50`` (mmdet's RetinaNet R50-FPN, no pretrained
    download) or of a bundled detector (a key of :data:`BUNDLED`)."""
    from mmengine.config import Config

    if name == 'r50':
        import mmdet
        path = Path(mmdet.__file__).parent / '.mim/configs/retinanet/retinanet_r50_fpn_1x_coco.py'
        cfg = Config.fromfile(str(path))
        cfg.model.backbone.init_cfg = None
        return cfg
    if name not in BUNDLED:
        raise KeyError(f'model {name!r}: allowed r50, {", ".join(BUNDLED)}')
    return Config.fromfile(str(REPO_ROOT / BUNDLED[name]))


def data_samples(size: int) -> list:
    """One sample's metainfo for a ``size x size`` input (a two-stage ``_forward`` reads
    ``img_shape`` for the RPN)."""
    from mmdet.structures import DetDataSample

    meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                scale_factor=(1.0, 1.0), batch_input_shape=(size, size))
    return [DetDataSample(metainfo=meta)]
