"""Fake quantizers (registered in ``mmdet_regptq.registry.QUANTIZERS``)."""
from .adaround import AdaRoundQuantizer
from .base import Quantizer
from .functional import fake_quant, fake_quant_export, grad_scale, quantize_int, round_ste
from .llaq import SEARCH_K, LLAQCodes, LLAQuantizer, llaq_dequant
from .llaq_round import LLAQRoundQuantizer
from .ranges import RANGE_METHODS, QuantGrid, qparams_from_range, register_range_method
from .rounding import HARD_ALPHA, LearnedRounding
from .uniform import UniformQuantizer

__all__ = [
    # base and quantizers
    'Quantizer', 'UniformQuantizer', 'AdaRoundQuantizer', 'LLAQuantizer', 'LLAQCodes',
    'LLAQRoundQuantizer', 'SEARCH_K', 'llaq_dequant', 'LearnedRounding', 'HARD_ALPHA',
    # clipping-range estimation
    'QuantGrid', 'RANGE_METHODS', 'register_range_method', 'qparams_from_range',
    # functional helpers
    'round_ste', 'grad_scale', 'fake_quant', 'quantize_int', 'fake_quant_export',
]
