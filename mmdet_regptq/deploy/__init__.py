"""Deployment: ONNX Q/DQ export, ONNX Runtime INT8, the MMDeploy ``tvm_int4`` backend.

Importing ``mmdet_regptq.deploy`` (a deploy config's ``custom_imports``) registers the
MMDeploy plugin (``tvm_int4`` / ``tvm_relax`` backends and the ``regptq_raw`` detector
model) when mmdeploy is installed; the export functions need only torch + onnx.
"""
from mmdet_regptq.deploy.detector import (RawDetector, build_detector, quantize_for_deploy,
                                          raw_output_names, unflatten_raw)
from mmdet_regptq.deploy.export import (ExportReport, check_onnx, export_mode, export_onnx,
                                        finalize_onnx, legacy_onnx_export, lower_quant_ops)
from mmdet_regptq.deploy.integer_graph import IntegerReport, to_integer_graph
from mmdet_regptq.deploy.ort_int8 import OrtInt8Report, make_ort_int8
from mmdet_regptq.deploy.tensorrt import TensorRTCheck, check_tensorrt_qdq

try:  # the plugin needs mmdeploy; the export does not
    from mmdet_regptq.deploy import mmdeploy_plugin  # noqa: F401  (registers the backends)
except ImportError as _err:  # pragma: no cover - mmdeploy missing
    mmdeploy_plugin = None
    _PLUGIN_ERROR = _err

__all__ = [
    # export
    'export_mode', 'export_onnx', 'finalize_onnx', 'legacy_onnx_export', 'lower_quant_ops',
    'check_onnx', 'ExportReport',
    # detectors
    'RawDetector', 'raw_output_names', 'unflatten_raw', 'build_detector', 'quantize_for_deploy',
    # backend graphs
    'make_ort_int8', 'OrtInt8Report', 'to_integer_graph', 'IntegerReport',
    'check_tensorrt_qdq', 'TensorRTCheck',
]
