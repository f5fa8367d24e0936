"""MMDeploy glue. Importing it registers, through mmdeploy 1.3.1's own registries, the
``tvm_int4`` / ``tvm_relax`` backend managers and wrapper (``managers``) and the
``regptq_raw`` detection backend model (``backend_model``)."""
from mmdet_regptq.deploy.mmdeploy import backend_model, managers  # noqa: F401  (register)
from mmdet_regptq.deploy.mmdeploy.backend_model import RawOutputDetector, stop_ort_spinning
from mmdet_regptq.deploy.mmdeploy.managers import (TVMInt4Manager, TVMRelaxManager,
                                                   TVMRelaxWrapper)
from mmdet_regptq.deploy.mmdeploy.options import regptq_options

__all__ = ['TVMInt4Manager', 'TVMRelaxManager', 'TVMRelaxWrapper', 'RawOutputDetector',
           'regptq_options', 'stop_ort_spinning']
