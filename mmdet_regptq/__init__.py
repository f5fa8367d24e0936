"""mmdet-regptq: full post-training quantization of MMDetection detectors.

Importing the package (``custom_imports=dict(imports=['mmdet_regptq'])`` in a config)
applies the stack fixes in :mod:`mmdet_regptq.compat` and registers the hook, the
quantizers and the PTQ methods. The pure PyTorch layers ``quant`` and ``calib`` never
import mmdet; ``models`` and ``engine`` do.
"""
from mmdet_regptq._runtime_entry import runtime_only
from mmdet_regptq.version import __version__

if not runtime_only():  # ``python -m mmdet_regptq.deploy.run`` needs neither torch nor mmdet
    from mmdet_regptq import compat

    compat.apply()

    from mmdet_regptq import calib, quant  # noqa: E402  (register quantizers and methods)
    from mmdet_regptq.engine import RegPTQHook, quantize_detector  # noqa: E402
    from mmdet_regptq import yolov5  # noqa: E402,F401  (YOLOv5 in mmdet's registries)

__all__ = ['__version__', 'RegPTQHook', 'quantize_detector', 'quant', 'calib']
