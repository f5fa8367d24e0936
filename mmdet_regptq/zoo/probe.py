"""One zoo config, end to end in this process: build with random init, predict in FP,
quantize (W4A4 default policy), calibrate, predict again; the result is one table row.

The sweep runs each config as ``python -m mmdet_regptq.zoo CONFIG --result JSON`` in a
child process with a CPU-time limit; the child rewrites the JSON after each stage, so a
killed child still tells how far it got.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import traceback
from pathlib import Path
from typing import Any

from mmdet_regptq.io import atomic_write_text
from mmdet_regptq.zoo.configs import (cap_proposals, mmdet_compat_cfg, mmdet_compat_model,
                                      offline_cfg, zoo_root)
from mmdet_regptq.zoo.inputs import MAX_RETRY_SIZE, input_too_small, synthetic_batch

__all__ = ['run_one', 'conv_linear_ids', 'count_quantized', 'finite_outputs',
           'recompute_bn_stats', 'DEFAULT_METHOD']

#: the calibration method of the sweep
DEFAULT_METHOD = 'RegPTQ'
#: Reg-PTQ's depth bound in the sweep (``schedule.max_tail_units``): a unit with more units
#: after it runs no tail of its own. With 2 iterations per unit a unit's tails (Fisher pass
#: + one ``L_G`` iteration) are two forward + backward passes of the rest of the network, so
#: without it the cost grows with the square of the depth (Hourglass-104, DINO); 32 leaves
#: every config with at most 33 units as without the bound.
DEFAULT_MAX_TAIL_UNITS = 32


def conv_linear_ids(model: Any) -> set[int]:
    """ids of every Conv2d / Linear module of a float model."""
    from torch import nn
    return {id(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def count_quantized(model: Any, float_ids: set[int]) -> int:
    """How many of ``float_ids`` now have a weight quantizer (MHA: in/out projections)."""
    from torch import nn

    from mmdet_regptq.quant import iter_quant_modules
    done: set[int] = set()
    for _, wrapper in iter_quant_modules(model):
        if isinstance(wrapper.module, nn.MultiheadAttention):
            if getattr(wrapper, 'out_weight_quantizer', None) is not None:
                done.add(id(wrapper.module.out_proj))
        elif wrapper.weight_quantizer is not None:
            done.add(id(wrapper.module))
    return len(done & float_ids)


def finite_outputs(results: list) -> bool:
    """Whether every float tensor in the predicted data samples is finite."""
    import torch

    def walk(obj: Any) -> bool:
        if isinstance(obj, torch.Tensor):
            return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
        if hasattr(obj, 'all_items'):
            return all(walk(v) for _, v in obj.all_items())
        if isinstance(obj, (list, tuple)):
            return all(walk(v) for v in obj)
        if isinstance(obj, dict):
            return all(walk(v) for v in obj.values())
        return True
    return walk(results)


def recompute_bn_stats(model: Any, batch: dict) -> None:
    """Set every BatchNorm's running statistics from one train-mode pass of the backbone
    and neck over ``batch`` (cumulative average), then back to eval mode."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    try:
        with torch.no_grad():
            data = model.data_preprocessor(batch, False)
            model.train()
            model.extract_feat(data['inputs'])
    finally:
        model.eval()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def _add_note(row: dict, note: str) -> None:
    row['note'] = f"{row['note']}; {note}" if row.get('note') else note


def run_one(config: str, *, max_size: int = 320, iters: int = 2, method: str | None = None,
            seed: int = 0, on_stage: Any = None, max_proposals: int = 100,
            max_tail_units: int | None = DEFAULT_MAX_TAIL_UNITS) -> dict:
    """Build, FP-predict, quantize, calibrate and predict one zoo config (this process).

    ``max_tail_units``: Reg-PTQ's ``schedule.max_tail_units`` (``None``: no bound; other
    methods ignore it). A row where it bit says so in its note (how many units were far).

    ``on_stage(row)`` is called after the FP prediction, after each calibrated unit and after
    the calibration, so that a parent that kills this process on timeout still knows how
    far it got (``units_done``, ``last_unit``).
    """
    on_stage = on_stage or (lambda row: None)
    import torch
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import mmdet_regptq  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmdet_regptq.engine.ptq import quantize_detector

    logger = MMLogger.get_instance('zoo_coverage', log_level='WARNING')
    MMLogger.get_instance('mmengine', log_level='WARNING')
    register_all_modules()
    path = Path(config) if Path(config).is_file() else zoo_root() / config
    row: dict[str, Any] = dict(config=str(path.relative_to(zoo_root())) if str(path).startswith(
        str(zoo_root())) else str(path), fp_ok=False, calibrated=False, predicted=False,
        stage='load', error='', n_conv_linear=0, n_quantized=0)
    method = method or DEFAULT_METHOD
    row['method'] = method
    start = time.perf_counter()
    try:
        cfg = Config.fromfile(str(path))
        if cfg.get('model') is None:
            raise KeyError('the config has no model (not a detector config)')
        init_default_scope(cfg.get('default_scope', 'mmdet'))
        model_cfg = offline_cfg(copy.deepcopy(cfg.model))
        capped = cap_proposals(model_cfg, max_proposals)
        if capped:
            row['note'] = f'RPN proposals {capped} -> {max_proposals} per image'
        for note in mmdet_compat_cfg(model_cfg):
            _add_note(row, note)
        row['stage'] = 'build'
        torch.manual_seed(seed)
        model = MODELS.build(model_cfg)
        model.init_weights()
        model.eval()
        for note in mmdet_compat_model(model):
            _add_note(row, note)
        size = max_size
        while True:
            row['stage'] = 'data'
            batch = synthetic_batch(cfg, 2, size)
            row['input'] = 'x'.join(str(s) for s in batch['inputs'][0].shape[-2:])
            row['stage'] = 'fp predict'
            try:
                with torch.no_grad():
                    fp_out = model.test_step(batch)
                break
            except RuntimeError as err:
                # the capped input is too small for the network (``_TOO_SMALL``): double
                # it up to MAX_RETRY_SIZE (the cap never enlarges past the config's size)
                if not input_too_small(err) or size >= MAX_RETRY_SIZE:
                    raise
                size *= 2
                _add_note(row, f'input --max-size {size}: {max_size} is too small for it')
        if not finite_outputs(fp_out):
            # random init: without trained BN statistics some deep backbones blow up
            # (Darknet-53's boxes overflow); take the statistics from the 2 images
            recompute_bn_stats(model, batch)
            _add_note(row, 'BN statistics from the 2 images (random init: non-finite FP)')
            with torch.no_grad():
                fp_out = model.test_step(batch)
            if not finite_outputs(fp_out):
                raise FloatingPointError('FP predictions are not finite (random init)')
        row['fp_ok'] = True
        float_ids = conv_linear_ids(model)
        row['n_conv_linear'] = len(float_ids)
        row['stage'] = 'quantize+calibrate'
        on_stage(row)
        method_cfg = dict(type=method, iters=iters, progress=False, log_interval=0)
        if method == 'RegPTQ' and max_tail_units is not None:
            method_cfg['schedule'] = dict(max_tail_units=max_tail_units)
            row['max_tail_units'] = max_tail_units
        result = quantize_detector(
            model, [batch], quant=dict(w_bits=4, a_bits=4), method=method_cfg,
            seed=seed, logger=logger, on_unit_end=lambda k, unit, stats: (
                row.update(units_done=k + 1, last_unit=unit.name), on_stage(row)))
        row['n_quantized'] = count_quantized(model, float_ids)
        row['n_units'] = len(result.get('stats', []))
        far = max(0, row['n_units'] - 1 - max_tail_units) if 'max_tail_units' in row else 0
        if far:
            _add_note(row, f'depth bound: {far} of {row["n_units"]} units far (no own tail, '
                           f'--max-tail-units {max_tail_units})')
        row['calibrated'] = True
        row['stage'] = 'predict'
        on_stage(row)
        with torch.no_grad():
            q_out = model.test_step(batch)
        if not finite_outputs(q_out):
            raise FloatingPointError('quantized predictions are not finite')
        row['predicted'] = True
        row['stage'] = 'done'
    except BaseException as err:  # noqa: BLE001 - every failure is a table row
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        lines = [ln for ln in f'{type(err).__name__}: {err}'.splitlines() if ln.strip()]
        row['error'] = ' '.join(lines[0].split())[:300] if lines else type(err).__name__
        row['traceback'] = traceback.format_exc()[-4000:]
        if row.get('n_conv_linear') and row['stage'] == 'quantize+calibrate':
            from mmdet_regptq.quant import iter_quant_modules
            row['n_quantized'] = count_quantized(model, float_ids) if any(
                True for _ in iter_quant_modules(model)) else 0
    row['seconds'] = round(time.perf_counter() - start, 1)
    return row


def main(argv: list[str] | None = None) -> None:
    """The sweep's child: run one config, keep ``--result`` up to date, print the row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='a config path, or one relative to mmdet/.mim/configs')
    parser.add_argument('--result', default=None, help='write the row here as JSON')
    parser.add_argument('--max-size', type=int, default=320)
    parser.add_argument('--iters', type=int, default=2)
    parser.add_argument('--max-proposals', type=int, default=100)
    parser.add_argument('--method', default=None)
    parser.add_argument('--max-tail-units', type=int, default=DEFAULT_MAX_TAIL_UNITS,
                        help="Reg-PTQ's schedule.max_tail_units (0: no bound)")
    args = parser.parse_args(argv)

    def write(row: dict) -> None:
        if args.result:
            atomic_write_text(json.dumps(row, indent=1), args.result)

    row = run_one(args.config, max_size=args.max_size, iters=args.iters, method=args.method,
                  on_stage=write, max_proposals=args.max_proposals,
                  max_tail_units=args.max_tail_units or None)
    write(row)
    print(json.dumps(row, indent=1))

