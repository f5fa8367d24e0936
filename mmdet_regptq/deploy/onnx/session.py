"""ONNX Runtime sessions whose idle worker threads do not spin between runs."""
from __future__ import annotations

from typing import Any

__all__ = ['ort_session_options']


def ort_session_options(threads: int = 0) -> Any:
    """ONNX Runtime session options whose idle worker threads do not spin between runs
    (``mmdeploy.backend_model.stop_ort_spinning`` says why); ``threads`` = intra-op threads,
    0 = ORT's default.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return options
