"""PTQ methods (registered in ``PTQ_METHODS``), each a small configuration of the loop."""
from .adaquant import AdaQuant
from .adaround import AdaRound
from .base import PTQMethod, UnitCallback, act_scale_params, build_method
from .brecq import BRECQ
from .pdquant import PDQuant
from .qdrop import QDrop
from .regptq import LLAQ_TARGETS, RegPTQ
from .regptq_config import ExperimentalConfig, LLAQConfig, RegPTQConfig, ScheduleConfig
from .scale_only import MSE, MinMax

__all__ = [
    # base and builder
    'PTQMethod', 'UnitCallback', 'act_scale_params', 'build_method',
    # methods
    'MinMax', 'MSE', 'AdaRound', 'AdaQuant', 'BRECQ', 'QDrop', 'PDQuant', 'RegPTQ',
    # Reg-PTQ's option groups (FGICConfig: calib.fgic)
    'RegPTQConfig', 'LLAQConfig', 'ScheduleConfig', 'ExperimentalConfig', 'LLAQ_TARGETS',
]
