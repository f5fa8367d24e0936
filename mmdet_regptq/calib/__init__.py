"""Calibration: reconstruction units, activation cache, ONE reconstruction loop, methods.

Pure PyTorch (plus mmengine's registry / logging): never imports mmdet or mmcv. Importing
this package registers the loss terms in ``RECON_LOSSES`` and the methods in
``PTQ_METHODS``.
"""
from .cache import GiB, ActivationCache, CacheEntry
from .capture import GradLoss, capture_unit, output_mse
from .fgic import (DetPredictions, FGICConfig, FGICLoss, GlobalLoss, aligned_iou, fgic_loss,
                   fgic_mask, fgic_set_loss, soft_cross_entropy)
from .losses import (FisherMSE, LinearTempDecay, OutputMSE, PredictionKL, ReconContext,
                     ReconLoss, RoundingRegularizer, reduce_errors)
from .methods import (MSE, AdaQuant, AdaRound, BRECQ, ExperimentalConfig, LLAQConfig, MinMax,
                      PDQuant, PTQMethod, QDrop, RegPTQ, RegPTQConfig, ScheduleConfig,
                      UnitCallback, act_scale_params, build_method)
from .reconstruct import (OptimGroup, ReconStats, mix_inputs, reconstruct,
                          rounding_quantizers)
from .tail import TailResult, TailRunner, maximal_prefix
from .trace import CallRecord, ForwardFn, StopForward, run_forward, trace_calls
from .units import ReconUnit, ends_in_residual_add, find_units, top_quant_layers

__all__ = [
    # units and tracing
    'ReconUnit', 'find_units', 'top_quant_layers', 'ends_in_residual_add',
    'CallRecord', 'trace_calls', 'run_forward', 'StopForward', 'ForwardFn',
    # activation capture
    'ActivationCache', 'CacheEntry', 'GiB', 'capture_unit', 'output_mse', 'GradLoss',
    'TailRunner', 'TailResult', 'maximal_prefix',
    # loss terms
    'ReconContext', 'ReconLoss', 'OutputMSE', 'FisherMSE', 'RoundingRegularizer',
    'LinearTempDecay', 'PredictionKL', 'reduce_errors', 'GlobalLoss',
    # Reg-PTQ's filtered global loss (FGIC)
    'DetPredictions', 'FGICConfig', 'FGICLoss', 'fgic_loss', 'fgic_set_loss', 'fgic_mask',
    'aligned_iou', 'soft_cross_entropy',
    # the loop
    'reconstruct', 'OptimGroup', 'ReconStats', 'rounding_quantizers', 'mix_inputs',
    # methods
    'PTQMethod', 'UnitCallback', 'act_scale_params', 'build_method', 'MinMax', 'MSE',
    'AdaRound', 'AdaQuant', 'BRECQ', 'QDrop', 'PDQuant', 'RegPTQ',
    # Reg-PTQ's option groups (with FGICConfig above)
    'RegPTQConfig', 'LLAQConfig', 'ScheduleConfig', 'ExperimentalConfig',
]
