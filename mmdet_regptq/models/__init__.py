"""mmdet adapters: how the engine runs, reads and decodes each detector family."""
from mmdet_regptq.models.adapters import (DETECTOR_ADAPTERS, DenseHeadAdapter, DetectorAdapter,
                                          DetPredictions, find_adapter, final_layer_patterns)

__all__ = ['DETECTOR_ADAPTERS', 'DetectorAdapter', 'DenseHeadAdapter', 'DetPredictions',
           'find_adapter', 'final_layer_patterns']
