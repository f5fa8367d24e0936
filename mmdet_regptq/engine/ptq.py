"""``quantize_detector``: the public function behind ``RegPTQHook`` (works without a Runner).

prepare (module swapping with the detector's default policy) -> calibrate (a registered
PTQ method over cached calibration batches) -> save (atomic ``quantized.pth``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from mmdet_regptq.engine.checkpoint import load_quantized, save_quantized
from mmdet_regptq.models.adapters import DetectorAdapter, find_adapter
from mmdet_regptq.quant import QuantPolicy, quantize_model
from mmdet_regptq.registry import PTQ_METHODS, build_from

_POLICY_KEYS = ('w_bits', 'a_bits', 'first_layer_bits', 'first_layer', 'fp_layers',
                'quantize_final', 'overrides', 'weight', 'act', 'fold_bn')


def build_policy(quant: dict, adapter: DetectorAdapter) -> QuantPolicy:
    """Translate the hook's ``quant=dict(...)`` into a ``QuantPolicy``.

    The adapter's final prediction layers are kept FP unless ``quantize_final=True``;
    user ``fp_layers`` are added to them.
    """
    unknown = sorted(set(quant) - set(_POLICY_KEYS))
    if unknown:
        raise KeyError(f'quant: unknown field(s) {unknown}; allowed: {list(_POLICY_KEYS)}')
    quant = dict(quant)
    fp_layers = list(quant.pop('fp_layers', []))
    if not quant.get('quantize_final', False):
        fp_layers = adapter.fp_layer_patterns() + fp_layers
    return QuantPolicy(fp_layers=fp_layers, **quant)


def prepare_batches(adapter: DetectorAdapter, loader: Iterable[dict]) -> list[dict]:
    """Preprocess every calibration batch once (normalise, pad, stack)."""
    batches = [adapter.prepare_batch(data) for data in loader]
    if not batches:
        raise ValueError('calib: the calibration loader yielded no batch')
    return batches


def quantize_detector(model: nn.Module, loader: Iterable[dict], *, quant: dict,
                      method: Any, work_dir: str | Path | None = None,
                      quantized_checkpoint: str | None = None, seed: int = 0,
                      logger: logging.Logger | None = None,
                      meta: dict | None = None) -> dict:
    """Quantize ``model`` in place and calibrate it (or load a saved result).

    Args:
        model: an mmdet detector (unwrapped), weights loaded.
        loader: calibration batches as the mmdet dataloader yields them.
        quant: policy fields (``w_bits``, ``a_bits``, overrides, ...).
        method: a PTQ method config (``dict(type='QDrop', iters=...)``) or object.
        work_dir: where ``quantized.pth`` is written (atomic); None = do not save.
        quantized_checkpoint: load this instead of calibrating.
        seed: seed of the calibration (same seed -> identical checkpoint).

    Returns:
        dict with the report table, method stats, seconds, and the checkpoint path.
    """
    logger = logger or logging.getLogger(__name__)
    model.eval()
    adapter = find_adapter(model)
    policy = build_policy(quant, adapter)
    method_obj = build_from(PTQ_METHODS, method, 'method')
    batches = prepare_batches(adapter, loader)
    report = quantize_model(model, policy, example_forward=lambda m: adapter.forward(m, batches[0]))
    logger.info('quantized layers:\n' + report.table())
    result: dict = {'report': report}
    start = time.perf_counter()
    if quantized_checkpoint:
        load_quantized(model, quantized_checkpoint, expect=_describe(quant, method))
        result['loaded'] = quantized_checkpoint
    else:
        torch.manual_seed(seed)
        result['stats'] = method_obj.calibrate(
            model, batches, adapter.forward, output_fn=adapter.logits, logger=logger, seed=seed)
        if work_dir is not None:
            path = Path(work_dir) / 'quantized.pth'
            save_quantized(model, path, meta={**(meta or {}), **_describe(quant, method)})
            result['checkpoint'] = str(path)
            logger.info(f'saved the quantized model to {path}')
    result['seconds'] = time.perf_counter() - start
    model.eval()
    return result


def _describe(quant: dict, method: Any) -> dict:
    """What must match between a saved quantized checkpoint and the model it loads into."""
    name = method.get('type') if isinstance(method, dict) else type(method).__name__
    return {'quant': dict(quant), 'method': name}
