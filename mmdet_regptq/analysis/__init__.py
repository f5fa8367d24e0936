"""Analysis tools for quantizing detectors: the paper's Observations 1-3 as functions with
plots, a per-layer sensitivity report and FP-vs-quantized pictures.

One module per command of ``tools/analyze.py`` (the CLI only parses arguments):
``noise`` (Observation 1), ``weights`` (Observation 3), ``scales`` (Observation 2),
``sensitivity``, ``compare``. They share a :class:`DetectorBench` (a detector and a fixed
set of preprocessed images) and the FP-vs-modified measures of :mod:`.metrics`.
"""
from mmdet_regptq.analysis.bench import Detections, DetectorBench, Snapshot, load_detector
from mmdet_regptq.analysis.branches import PARTS, layer_parts, weighted_layers
from mmdet_regptq.analysis.compare import (CompareConfig, CompareResult, load_quantized_detector,
                                           run_compare)
from mmdet_regptq.analysis.metrics import (ImageDiff, ProxyConfig, compare_snapshots,
                                           detection_errors, match_detections, output_errors)
from mmdet_regptq.analysis.noise import NOISE_KINDS, NoiseConfig, NoiseResult, run_noise
from mmdet_regptq.analysis.report import Table
from mmdet_regptq.analysis.scales import ScalesConfig, ScalesResult, run_scales
from mmdet_regptq.analysis.sensitivity import (SensitivityConfig, SensitivityResult,
                                               format_overrides, run_sensitivity)
from mmdet_regptq.analysis.weights import WeightsConfig, WeightsResult, run_weights

__all__ = [
    # the detector and its images
    'DetectorBench', 'Detections', 'Snapshot', 'load_detector',
    # layer grouping
    'PARTS', 'layer_parts', 'weighted_layers',
    # FP-vs-modified measures
    'ProxyConfig', 'ImageDiff', 'output_errors', 'match_detections', 'detection_errors',
    'compare_snapshots',
    # commands
    'NoiseConfig', 'NoiseResult', 'NOISE_KINDS', 'run_noise',
    'WeightsConfig', 'WeightsResult', 'run_weights',
    'ScalesConfig', 'ScalesResult', 'run_scales',
    'SensitivityConfig', 'SensitivityResult', 'run_sensitivity', 'format_overrides',
    'CompareConfig', 'CompareResult', 'run_compare', 'load_quantized_detector',
    # output
    'Table',
]
