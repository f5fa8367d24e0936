"""``quantize_detector``: the public function behind ``RegPTQHook`` (works without a Runner).

prepare (module swapping with the detector's default policy) -> calibrate (a registered
PTQ method over cached calibration batches) -> save (atomic ``quantized.pth``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from mmdet_regptq.calib import FGICLoss, output_mse
from mmdet_regptq.calib import dist as calib_dist
from mmdet_regptq.engine.checkpoint import check_fp_weights, load_quantized, save_quantized
from mmdet_regptq.engine.resume import (CalibrationResume, fingerprint, plain_data,
                                        sigterm_as_exception, weights_digest)
from mmdet_regptq.engine.validate import build_method, check_unmatched
from mmdet_regptq.models.adapters import DetectorAdapter, find_adapter
from mmdet_regptq.quant import QuantPolicy, quantize_model

def build_policy(quant: QuantPolicy | Mapping[str, Any] | None,
                 adapter: DetectorAdapter | None = None) -> QuantPolicy:
    """The hook's ``quant=dict(...)`` as a validated ``QuantPolicy`` (no model needed).

    Fields, defaults and checks are :meth:`QuantPolicy.from_cfg`'s. With an ``adapter``,
    the detector's final prediction layers join ``final_layers`` (kept FP unless
    ``quantize_final=True``).
    """
    policy = QuantPolicy.from_cfg(quant)
    if adapter is None:
        return policy
    return dataclasses.replace(
        policy, final_layers=adapter.fp_layer_patterns() + policy.final_layers)


def prepare_batches(adapter: DetectorAdapter, loader: Iterable[dict]) -> list[dict]:
    """Preprocess every calibration batch once (normalise, pad, stack)."""
    batches = [adapter.prepare_batch(data) for data in loader]
    if not batches:
        raise ValueError('calib: the calibration loader yielded no batch')
    return batches


def build_global_loss(adapter: DetectorAdapter, fgic: Any, batch: dict,
                      logger: logging.Logger) -> Callable[[Any, Any], torch.Tensor]:
    """FGIC when the adapter can decode this detector's head, else MSE of the raw outputs.

    Decoding is probed on one FP forward of ``batch``: heads with no box decoding that the
    adapter knows (keypoint heads such as CornerNet's) still calibrate, with a warning
    that names the head and what failed, instead of failing in the middle of the run.
    """
    loss = adapter.global_loss(fgic)
    try:
        with torch.no_grad():
            adapter.decode_stages(adapter.forward(adapter.model, batch))
    except (AssertionError, AttributeError, IndexError, KeyError, NotImplementedError,
            TypeError, ValueError) as err:   # AssertionError: mmdet's box coders assert shapes
        head = getattr(adapter.model, 'bbox_head', None)
        first_line = (str(err).splitlines() or [''])[0][:160]
        logger.warning(
            f'Reg-PTQ: {type(adapter).__name__} cannot decode '
            f'{type(head).__name__ if head is not None else type(adapter.model).__name__} '
            f'into boxes ({type(err).__name__}: {first_line}); the global '
            'loss falls back to the MSE of the raw head outputs (no FGIC filters)')
        return output_mse
    return loss


def quantize_detector(model: nn.Module, loader: Iterable[dict], *, quant: dict,
                      method: Any, work_dir: str | Path | None = None,
                      quantized_checkpoint: str | None = None, seed: int = 0,
                      logger: logging.Logger | None = None,
                      meta: dict | None = None, resume: bool = True,
                      recalibrate: bool = False, strict: bool = True,
                      on_unit_end: Callable[[int, Any, Any], None] | None = None) -> dict:
    """Quantize ``model`` in place and calibrate it (or load a saved result).

    Args:
        model: an mmdet detector (unwrapped), weights loaded.
        loader: calibration batches as the mmdet dataloader yields them.
        quant: policy fields (``w_bits``, ``a_bits``, overrides, ...).
        method: a PTQ method config (``dict(type='QDrop', iters=...)``) or object.
        work_dir: where ``quantized.pth`` is written (atomic); None = do not save.
        quantized_checkpoint: load this instead of calibrating.
        seed: seed of the calibration (same seed -> identical checkpoint).
        resume: with a ``work_dir``, save the state after every finished unit
            (``quantized.partial.pth``, atomic) and continue from it on a rerun with the
            same settings and FP weights; a finished ``quantized.pth`` with the same
            fingerprint is loaded instead of calibrating (see
            :mod:`mmdet_regptq.engine.resume`).
        recalibrate: ignore a finished ``quantized.pth`` and a partial state in
            ``work_dir``; calibrate every unit again.
        strict: a user ``fp_layers`` / ``overrides`` regex matching no layer is an error
            (False: a warning in ``logger``).
        on_unit_end: extra ``calibrate`` callback ``(index, unit, stats)``, called after
            the partial state of that unit is saved.

    Returns:
        dict with the report table, method stats, seconds, and the checkpoint path.
    """
    logger = logger or logging.getLogger(__name__)
    model.eval()
    adapter = find_adapter(model)
    policy = build_policy(quant, adapter)
    # the bits are recorded in the checkpoint meta and the resume fingerprint, given or not
    quant = {'w_bits': policy.w_bits, 'a_bits': policy.a_bits, **quant}
    method_obj = build_method(method)
    method_obj.set_layer_defaults(head=adapter.head_layer_patterns(),
                                  regression=adapter.regression_layer_patterns())
    method_obj.set_output_defaults(sigmoid=adapter.uses_sigmoid)   # PD-Quant's KL
    if not quantized_checkpoint:
        check_fp_weights(model)   # NaN/Inf in the loaded checkpoint: fail before any unit
    session = None
    if work_dir is not None and resume and not quantized_checkpoint:
        weights = weights_digest(model)   # the FP state as loaded, before module swapping
    batches = prepare_batches(adapter, loader)
    # Reg-PTQ's FGIC on decoded predictions; other methods keep their default (output MSE).
    # Probed on the float model before swapping; not needed when a checkpoint is loaded.
    fgic = method_obj.global_loss_config()
    global_loss = (build_global_loss(adapter, fgic, batches[0], logger)
                   if fgic is not None and not quantized_checkpoint else None)
    report = quantize_model(model, policy, example_forward=lambda m: adapter.forward(m, batches[0]))
    check_unmatched(report, quant, strict=strict, logger=logger)
    logger.info('quantized layers:\n' + report.table())
    result: dict = {'report': report}
    start, cpu_start = time.perf_counter(), time.process_time()
    if work_dir is not None and resume and not quantized_checkpoint:
        # --- resume (engine/resume.py): partial state per unit, finished file reused -----
        session = CalibrationResume(work_dir, fingerprint(
            quant=quant, method=method, seed=seed, batches=batches,
            layers=[(r.name, r.w_bits, r.a_bits) for r in report.layers],
            config=(meta or {}).get('config'), weights=weights), logger=logger)
        finished = None if recalibrate else session.finished()
        if finished is not None:
            quantized_checkpoint = str(finished)
            result['reused'] = quantized_checkpoint
    # data-parallel calibration: the main process (the one with the work_dir) decides
    quantized_checkpoint = calib_dist.from_main(quantized_checkpoint)
    if quantized_checkpoint:
        method_obj.prepare_model(model)   # e.g. Reg-PTQ's LLAQ layers carry their own state
        load_quantized(model, quantized_checkpoint, expect=_describe(quant, method))
        result['loaded'] = quantized_checkpoint
        if session is not None:   # reused: a partial file of the same run is obsolete
            session.finish()
    else:
        partial = session
        start_unit = None
        if partial is not None:
            state = partial.load(ignore=recalibrate)
            if state is not None:
                units = method_obj.find_units(model, adapter.forward, batches[0])
                start_unit = partial.restore(model, method_obj, units, state)
        if calib_dist.is_active():   # the other ranks take the main process's partial state
            start_unit = calib_dist.from_main(start_unit)
            if start_unit and partial is None:
                method_obj.restore_finished(model, method_obj.find_units(
                    model, adapter.forward, batches[0]), start_unit)
            if start_unit:
                calib_dist.broadcast_state(model)
        callbacks = ([partial.on_unit_end(model)] if partial else []) + (
            [on_unit_end] if on_unit_end else [])
        # --------------------------------------------------------------------------------
        torch.manual_seed(seed)
        # FGIC decodes boxes only: its tail forwards can leave out what decoding never reads
        tail_fn = adapter.box_forward if isinstance(global_loss, FGICLoss) else None
        with sigterm_as_exception(partial, logger):
            result['stats'] = method_obj.calibrate(
                model, batches, adapter.forward, output_fn=adapter.logits,
                global_loss=global_loss, logger=logger, seed=seed, start_unit=start_unit or 0,
                on_unit_end=_chain(callbacks), tail_fn=tail_fn)
        calib_dist.check_identical(model)   # data-parallel: every rank ends the same
        if work_dir is not None:
            path = Path(work_dir) / 'quantized.pth'
            fprint = {'fingerprint': partial.fingerprint} if partial is not None else {}
            save_quantized(model, path, meta={**(meta or {}), **_describe(quant, method),
                                              **_method_options(method), **fprint},
                           logger=logger)
            result['checkpoint'] = str(path)
            logger.info(f'saved the quantized model to {path}')
        calib_dist.barrier()   # data-parallel: the others wait until it is written
        if partial is not None:
            partial.finish()
        result['resumed_from_unit'] = start_unit or 0
    result['seconds'] = time.perf_counter() - start
    if 'stats' in result:
        size = calib_dist.world()[1]
        logger.info(f'calibration took {result["seconds"]:.1f} s (CPU time of this process '
                    f'{time.process_time() - cpu_start:.1f} s)'
                    + (f', data-parallel over {size} processes' if size > 1 else ''))
    model.eval()
    return result


def _describe(quant: dict, method: Any) -> dict:
    """What must match between a saved quantized checkpoint and the model it loads into."""
    name = method.get('type') if isinstance(method, dict) else type(method).__name__
    return {'quant': plain_data(quant), 'method': name}


def _method_options(method: Any) -> dict:
    """``{'method_cfg': {...}}`` for a config-dict method (so a deploy rebuilds it with
    the same options, e.g. LLAQ's ``power_of_two``); empty for a method object."""
    if not isinstance(method, dict):
        return {}
    return {'method_cfg': plain_data(method)}


def _chain(callbacks: list[Callable[..., None]]) -> Callable[..., None] | None:
    """One ``on_unit_end`` calling each callback in order (``None`` when there is none)."""
    if not callbacks:
        return None

    def call_all(*args: Any) -> None:
        for callback in callbacks:
            callback(*args)
    return call_all
