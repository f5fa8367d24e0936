"""The models the benchmarks build: the bundled synthetic detectors (configs and trained
checkpoints of this checkout) and RetinaNet R50-FPN from mmdet's zoo config, with the
quantization presets the deployment rows use."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ['REPO_ROOT', 'SYNTHETIC_ROOT', 'SYNTHETIC_DETECTORS', 'BUNDLED', 'CHECKPOINTS',
           'REAL_DETECTORS', 'W4A4', 'W8A8', 'model_config', 'data_samples', 'realdata_dir',
           'real_checkpoint']

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

#: real COCO-pretrained detectors: name -> (config, release checkpoint in the real-data
#: folder)
REAL_DETECTORS = {'yolov5n': ('configs/yolov5/yolov5_n_coco128.py', 'yolov5n/yolov5n.pt')}

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


def realdata_dir() -> Path:
    """``$REGPTQ_REALDATA`` or ``../shared/realdata`` beside the checkout (the release
    weights are AGPL-3.0: read from there, never copied into the checkout)."""
    return Path(os.environ.get('REGPTQ_REALDATA', REPO_ROOT.parent / 'shared' / 'realdata'))


def real_checkpoint(detector: str, out: Path) -> Path:
    """A real detector's release checkpoint converted under ``out/<detector>/`` (once);
    a missing release file stops the benchmark with the folder to set."""
    from mmdet_regptq.yolov5.convert import convert_yolov5

    config, original = REAL_DETECTORS[detector]
    converted = Path(out) / detector / f'{Path(original).stem}_mmdet.pth'
    if not converted.is_file():
        source = realdata_dir() / original
        if not source.is_file():
            raise SystemExit(f'{detector}: {source} not found (set REGPTQ_REALDATA to the '
                             'folder holding yolov5n/, coco128_train2017/, coco128_val2017/)')
        convert_yolov5(source, converted, config=REPO_ROOT / config)
    return converted
