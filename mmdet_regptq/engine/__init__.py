"""MMEngine pieces: the hook, calibration data, quantized checkpoints."""
from mmdet_regptq.engine.calib_data import build_calib_loader
from mmdet_regptq.engine.checkpoint import load_quantized, save_quantized
from mmdet_regptq.engine.hook import RegPTQHook
from mmdet_regptq.engine.ptq import build_policy, quantize_detector

__all__ = ['RegPTQHook', 'quantize_detector', 'build_policy', 'build_calib_loader',
           'save_quantized', 'load_quantized']
