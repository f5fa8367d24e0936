"""mmdet adapters: how the engine runs, reads and decodes each detector family."""
from mmdet_regptq.models.adapters import (DENSE_DECODERS, DETECTOR_ADAPTERS, FINAL_LAYER_NAMES,
                                          CascadeAdapter, DenseHeadAdapter, DetectorAdapter,
                                          DetPredictions, DETRAdapter, QueryTwoStageAdapter,
                                          RawOutputs, TwoStageAdapter, find_adapter,
                                          final_layer_patterns)

__all__ = ['DETECTOR_ADAPTERS', 'DENSE_DECODERS', 'FINAL_LAYER_NAMES', 'DetectorAdapter',
           'DenseHeadAdapter', 'TwoStageAdapter', 'CascadeAdapter', 'DETRAdapter',
           'QueryTwoStageAdapter', 'DetPredictions', 'RawOutputs', 'find_adapter',
           'final_layer_patterns']
