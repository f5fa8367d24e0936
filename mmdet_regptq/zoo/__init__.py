"""Does "three lines in any MMDet config" hold for mmdet's own model zoo? The sweep behind
``tools/zoo_coverage.py`` and the results in ``docs/results/zoo.md``.

- :mod:`.configs`: the representative config of each zoo folder, made to build offline;
- :mod:`.inputs`: the synthetic images through the config's own (size-capped) test pipeline;
- :mod:`.probe`: one config end to end (FP predict, quantize, calibrate, predict);
- :mod:`.report`: failure classes and the Markdown report;
- :mod:`.sweep`: every config in its own process with a CPU-time limit, resumable.
"""
from mmdet_regptq.zoo.configs import (EXCLUDED, PREFERRED, cap_proposals, mmdet_compat_cfg,
                                      mmdet_compat_model, offline_cfg, pick_representative,
                                      representatives, zoo_root)
from mmdet_regptq.zoo.inputs import (capped_test_pipeline, input_too_small, synthetic_batch,
                                     synthetic_images)
from mmdet_regptq.zoo.probe import count_quantized, finite_outputs, run_one
from mmdet_regptq.zoo.report import finalize, render, timeout_row
from mmdet_regptq.zoo.sweep import SweepOptions, run_sweep

__all__ = [
    # choosing and preparing configs
    'EXCLUDED', 'PREFERRED', 'zoo_root', 'pick_representative', 'representatives',
    'offline_cfg', 'mmdet_compat_cfg', 'mmdet_compat_model', 'cap_proposals',
    # inputs
    'capped_test_pipeline', 'input_too_small', 'synthetic_images', 'synthetic_batch',
    # one config
    'run_one', 'count_quantized', 'finite_outputs',
    # the sweep and its report
    'SweepOptions', 'run_sweep', 'finalize', 'render', 'timeout_row',
]
