"""Pure-PyTorch quantization layer: quantizers, wrappers, conversion, observers, packing.

Imports only torch, numpy and mmengine's registry (never mmdet / mmcv). Importing this
package registers the quantizers ('Uniform', 'AdaRound', 'LLAQ', 'LLAQRound') in ``QUANTIZERS``.
"""
from .convert import (SAFE_SUBCLASSES, WRAPPERS, LayerInfo, QuantReport, find_quantizable,
                      iter_quant_modules, quantize_model, restore_float, set_drop_prob,
                      set_quant_state)
from .fold_bn import fold_bn, fold_conv_bn
from .modules import (QuantConv2d, QuantizerFactory, QuantLinear, QuantModule,
                      QuantMultiheadAttention)
from .observers import ActivationObserver, init_activation_quantizers
from .packing import pack_int, packed_numel, unpack_int, values_per_word
from .policy import A_BITS_RANGE, W_BITS_RANGE, QuantPolicy
from .quantizers import (RANGE_METHODS, SEARCH_K, AdaRoundQuantizer, LLAQCodes, LLAQRoundQuantizer,
                         LLAQuantizer,
                         QuantGrid, Quantizer, UniformQuantizer, fake_quant, fake_quant_export,
                         grad_scale, llaq_dequant, qparams_from_range, quantize_int,
                         register_range_method, round_ste)
from .utils import eval_mode, module_locations, replace_module

__all__ = [
    # quantizers
    'Quantizer', 'UniformQuantizer', 'AdaRoundQuantizer', 'LLAQuantizer', 'LLAQCodes',
    'LLAQRoundQuantizer', 'SEARCH_K', 'llaq_dequant',
    # scale / range estimation
    'QuantGrid', 'RANGE_METHODS', 'register_range_method', 'qparams_from_range',
    'ActivationObserver', 'init_activation_quantizers',
    # functional fake quantization
    'round_ste', 'grad_scale', 'fake_quant', 'quantize_int', 'fake_quant_export',
    # wrappers
    'QuantModule', 'QuantConv2d', 'QuantLinear', 'QuantMultiheadAttention', 'QuantizerFactory',
    # conversion
    'QuantPolicy', 'W_BITS_RANGE', 'A_BITS_RANGE', 'quantize_model', 'QuantReport', 'LayerInfo',
    'find_quantizable', 'WRAPPERS', 'SAFE_SUBCLASSES', 'fold_bn', 'fold_conv_bn',
    # model-wide state
    'iter_quant_modules', 'set_quant_state', 'set_drop_prob', 'restore_float',
    # integer packing
    'pack_int', 'unpack_int', 'values_per_word', 'packed_numel',
    # model surgery
    'replace_module', 'module_locations', 'eval_mode',
]
