"""Deployment, one subpackage per system:

- ``detectors/``: which part of a (quantized) mmdet detector becomes a graph (raw outputs,
  the two graphs of a two-stage detector, the end-to-end graph with decoding and NMS);
- ``onnx/``: ONNX Q/DQ export and lowering, ONNX Runtime INT8, ORT sessions and profiling;
- ``tvm/``: the integer graph, TVM Relax build, CPU schedules, the VNNI kernel, the runner;
- ``mmdeploy/``: the MMDeploy plugin (``tvm_int4`` / ``tvm_relax`` backends, the
  ``regptq_raw`` backend model), the pipeline behind ``tools/deploy.py``, TensorRT checks;
- ``runtime/`` and ``run.py``: the torch-free runtime of a deployed work dir.

Importing ``mmdet_regptq.deploy`` (a deploy config's ``custom_imports``) registers the
MMDeploy plugin when mmdeploy is installed; the export functions need only torch + onnx.
"""
from mmdet_regptq._runtime_entry import runtime_only

if not runtime_only():  # ``python -m mmdet_regptq.deploy.run``: no torch, no mmdet
    from mmdet_regptq.deploy.detectors.build import build_detector, quantize_for_deploy
    from mmdet_regptq.deploy.detectors.raw import (RawDetector, raw_output_names,
                                                   unflatten_raw)
    from mmdet_regptq.deploy.mmdeploy.tensorrt import TensorRTCheck, check_tensorrt_qdq
    from mmdet_regptq.deploy.onnx.export import (export_mode, export_onnx, finalize_onnx,
                                                 legacy_onnx_export)
    from mmdet_regptq.deploy.onnx.lower import ExportReport, check_onnx, lower_quant_ops
    from mmdet_regptq.deploy.onnx.ort_int8 import OrtInt8Report, make_ort_int8
    from mmdet_regptq.deploy.tvm.integer_graph import IntegerReport, to_integer_graph

    try:  # the plugin needs mmdeploy; the export does not
        from mmdet_regptq.deploy import mmdeploy  # noqa: F401  (registers the backends)
    except ImportError as _err:  # pragma: no cover - mmdeploy missing
        mmdeploy = None
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
