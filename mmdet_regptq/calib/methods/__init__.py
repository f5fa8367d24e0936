"""PTQ methods (registered in ``PTQ_METHODS``), each a small configuration of the loop."""
from .adaquant import AdaQuant
from .adaround import AdaRound
from .base import PTQMethod, UnitCallback, act_scale_params
from .brecq import BRECQ
from .qdrop import PDQuant, QDrop
from .regptq import LLAQ_TARGETS, RegPTQ
from .scale_only import MSE, MinMax

__all__ = ['PTQMethod', 'UnitCallback', 'act_scale_params', 'MinMax', 'MSE', 'AdaRound',
           'AdaQuant', 'BRECQ', 'QDrop', 'PDQuant', 'RegPTQ', 'LLAQ_TARGETS']
