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

Arguments are checked when the hook is built (config load), so a typo fails in seconds.
Before calibrating for test, the FP checkpoint (``load_from``) is compared with the model:
the Runner loads it non-strictly, and a checkpoint of another detector would be quantized
with layers left at random init (:func:`~mmdet_regptq.engine.checkpoint.check_fp_checkpoint`).
"""
from __future__ import annotations

import copy
import os.path as osp
from typing import Any

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmdet.registry import HOOKS

from mmdet_regptq.engine.calib_data import build_calib_loader
from mmdet_regptq.engine.checkpoint import check_fp_checkpoint
from mmdet_regptq.engine.ptq import quantize_detector
from mmdet_regptq.engine.validate import build_method, check_calib, check_flag, check_quant


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
        save: write ``work_dir/quantized.pth`` after calibration. A rerun into the same
            work_dir reuses a finished ``quantized.pth`` made with the same config, bits,
            method, seed, calibration images and FP weights (log line ``reusing the
            finished calibration``), and resumes an interrupted one from its last unit.
        on_val: also quantize for validation during training.
        recalibrate: ignore a finished ``quantized.pth`` / partial state in work_dir and
            calibrate every unit again.
        strict: a ``quant.fp_layers`` / ``quant.overrides`` regex that matches no layer,
            and a ``load_from`` checkpoint with missing, unexpected or differently shaped
            keys, are errors (False: warnings in the work-dir log).
    """

    priority = 'LOW'

    def __init__(self, quant: dict | None = None, method: Any = None, calib: dict | None = None,
                 quantized_checkpoint: str | None = None, save: bool = True,
                 on_val: bool = True, recalibrate: bool = False, strict: bool = True) -> None:
        self.quant = dict(quant or {})   # defaults: QuantPolicy (engine.build_policy)
        check_quant(self.quant)
        self.method = method if method is not None else dict(type='RegPTQ')
        build_method(self.method)   # type, options and their ranges; the run builds its own
        self.calib = check_calib(calib)
        if quantized_checkpoint is not None and not isinstance(quantized_checkpoint, str):
            raise TypeError(f'quantized_checkpoint={quantized_checkpoint!r} must be a path')
        self.quantized_checkpoint = quantized_checkpoint
        self.save = check_flag('save', save)
        self.on_val = check_flag('on_val', on_val)
        self.recalibrate = check_flag('recalibrate', recalibrate)
        self.strict = check_flag('strict', strict)
        self.result: dict | None = None
        self._float_model = None

    # --- test -------------------------------------------------------------------------
    def before_test(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if getattr(model, '_regptq_quantized', False):
            return
        self._check_checkpoint(runner, model)
        self.result = self._quantize(runner, model)

    # --- validation during training ---------------------------------------------------
    def before_val(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not _is_training_run(runner):  # `runner.val()`: quantize in place, as for test
            if not getattr(model, '_regptq_quantized', False):
                self._check_checkpoint(runner, model)
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
    def _check_checkpoint(self, runner, model) -> None:
        """The Runner's ``load_from`` must fit the model (it loads non-strictly)."""
        load_from = getattr(runner, '_load_from', None) or runner.cfg.get('load_from')
        if self.quantized_checkpoint or not isinstance(load_from, str) or \
                not osp.isfile(load_from):
            return   # nothing to calibrate, no checkpoint, or a remote one (URL)
        check_fp_checkpoint(model, load_from, strict=self.strict, logger=runner.logger)

    def _quantize(self, runner, model, save: bool | None = None) -> dict:
        save = self.save if save is None else save
        calib = dict(self.calib)
        loader = build_calib_loader(runner.cfg, **calib)
        result = quantize_detector(
            model, loader, quant=self.quant, method=self.method,
            work_dir=runner.work_dir if (save and is_main_process()) else None,
            quantized_checkpoint=self.quantized_checkpoint, seed=calib.get('seed', 0),
            logger=runner.logger, meta={'config': runner.cfg.filename},
            recalibrate=self.recalibrate, strict=self.strict)
        model._regptq_quantized = True
        return result


def _is_training_run(runner) -> bool:
    """True when validation happens inside ``runner.train()`` (not ``runner.val()``)."""
    loop = getattr(runner, '_train_loop', None)
    return loop is not None and not isinstance(loop, dict)
