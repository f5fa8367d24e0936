"""``RegPTQHook``: quantize and calibrate the detector right before mmdet evaluates it.

Stage: ``before_test`` (``mim run mmdet test``) runs after the Runner has loaded the
checkpoint and before the first test batch, so mmdet's own TestLoop and metric evaluate
the quantized model. During training (``mim run mmdet train`` with validation) the hook
calibrates a COPY of the model in ``before_val`` and swaps it in for the validation only
(``after_val`` restores the float model, which keeps training).

Distributed (``--launcher pytorch``, ``torchrun``): the calibration is data-parallel: each
rank calibrates on its own part of the seeded images and the learned quantization
parameters' gradients are averaged over the ranks every iteration
(:mod:`mmdet_regptq.calib.dist`); the ranks end with the same quantized model (checked)
and only the main process writes ``quantized.pth``.
Priority ``LOW``: after the hooks that prepare the model (e.g. loading), before logging.
"""
from __future__ import annotations

import copy
from typing import Any

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmdet.registry import HOOKS

from mmdet_regptq.engine.calib_data import build_calib_loader
from mmdet_regptq.engine.ptq import quantize_detector

_CALIB_KEYS = ('num_images', 'batch_size', 'seed', 'dataloader', 'num_workers')


@HOOKS.register_module()
class RegPTQHook(Hook):
    """Fully quantize the detector (backbone, neck, heads) with a PTQ method.

    Args:
        quant: policy fields: ``w_bits`` (2..8), ``a_bits`` (2..16),
            ``first_layer_bits`` (8), ``quantize_final`` (False), ``fp_layers``,
            ``overrides`` (regex -> dict(w_bits=..., a_bits=...)), ``weight``/``act``
            quantizer configs.
        method: PTQ method config, e.g. ``dict(type='RegPTQ')`` or ``dict(type='QDrop',
            iters=2000)``; see ``mmdet_regptq.registry.PTQ_METHODS``.
        calib: ``num_images`` (256), ``batch_size`` (2), ``seed`` (0), or a full
            ``dataloader=dict(dataset=...)``.
        quantized_checkpoint: load this quantized checkpoint instead of calibrating.
        save: write ``work_dir/quantized.pth`` after calibration.
        on_val: also quantize for validation during training.
    """

    priority = 'LOW'

    def __init__(self, quant: dict | None = None, method: Any = None, calib: dict | None = None,
                 quantized_checkpoint: str | None = None, save: bool = True,
                 on_val: bool = True) -> None:
        self.quant = dict(quant or {})   # defaults: QuantPolicy (engine.build_policy)
        self.method = method if method is not None else dict(type='RegPTQ')
        self.calib = dict(calib or {})
        unknown = sorted(set(self.calib) - set(_CALIB_KEYS))
        if unknown:
            raise KeyError(f'calib: unknown field(s) {unknown}; allowed: {list(_CALIB_KEYS)}')
        self.quantized_checkpoint = quantized_checkpoint
        self.save = save
        self.on_val = on_val
        self.result: dict | None = None
        self._float_model = None

    # --- test -------------------------------------------------------------------------
    def before_test(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if getattr(model, '_regptq_quantized', False):
            return
        self.result = self._quantize(runner, model)

    # --- validation during training ---------------------------------------------------
    def before_val(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not _is_training_run(runner):  # `runner.val()`: quantize in place, as for test
            if not getattr(model, '_regptq_quantized', False):
                self.result = self._quantize(runner, model)
            return
        if not self.on_val:
            return
        self._float_model = runner.model
        quantized = copy.deepcopy(model)
        self.result = self._quantize(runner, quantized, save=False)
        runner.model = quantized

    def after_val(self, runner) -> None:
        if self._float_model is not None:
            runner.model = self._float_model
            self._float_model = None

    # --- shared -----------------------------------------------------------------------
    def _quantize(self, runner, model, save: bool | None = None) -> dict:
        save = self.save if save is None else save
        calib = dict(self.calib)
        loader = build_calib_loader(runner.cfg, **calib)
        result = quantize_detector(
            model, loader, quant=self.quant, method=self.method,
            work_dir=runner.work_dir if (save and is_main_process()) else None,
            quantized_checkpoint=self.quantized_checkpoint, seed=calib.get('seed', 0),
            logger=runner.logger, meta={'config': runner.cfg.filename})
        model._regptq_quantized = True
        return result


def _is_training_run(runner) -> bool:
    """True when validation happens inside ``runner.train()`` (not ``runner.val()``)."""
    loop = getattr(runner, '_train_loop', None)
    return loop is not None and not isinstance(loop, dict)
