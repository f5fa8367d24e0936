"""Quantized checkpoints: the calibrated model with its weights stored as packed integers.

Format 2 (written by :func:`save_quantized`)::

    {'state_dict': {...},          # everything that stays float (FP layers, biases, norms,
                                   #  activation quantizers), keyed as model.state_dict()
     'packed': {weight_key: {'layer', 'slot', 'bits', 'signed', 'shape', 'codes',
                             'scale', 'zero_point', 'quantizer'}},
     'meta': {..., 'format_version': 2, 'storage': {...bytes...}}}

``codes`` are the integer weight codes ``c`` packed by :func:`~mmdet_regptq.quant.pack_int`
(``32 // bits`` values per int32 word); the weight is ``(c - zero_point) * scale``
(``scale``/``zero_point`` per output channel, broadcast shapes). The codes are read off the
quantizer's own forward, so a loaded model computes bit-identical weights. Only plain
tensors, ints, strings and bools are stored: the file loads with ``weights_only=True``.

A quantized checkpoint is only meaningful for the model, bits and method that produced
it: loading checks the layers in model order, then the recorded method/bits, and names the
first mismatching layer. Format 1 (a full float ``state_dict``) still loads.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from mmengine.logging import MMLogger
from torch import Tensor, nn

from mmdet_regptq.io import atomic_save
from mmdet_regptq.quant import (AdaRoundQuantizer, QuantModule, UniformQuantizer, pack_int,
                                unpack_int)
from mmdet_regptq.safe_load import CorruptCheckpointError, load_checkpoint_file

FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
MiB = float(1 << 20)


# ---------------------------------------------------------------------------- packing
def _slots(model: nn.Module) -> Iterator[tuple[str, QuantModule, str, str]]:
    """``(wrapper_name, wrapper, slot, quantizer_attr)`` for every weight slot with a
    quantizer, under every name a wrapper is registered with (state-dict order)."""
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantModule):
            for slot, attr in module.weight_slots().items():
                if getattr(module, attr) is not None:
                    yield name, module, slot, attr


def _prefix(name: str) -> str:
    return f'{name}.' if name else ''


def _packable(wrapper: QuantModule, q: nn.Module) -> bool:
    if not (wrapper.quant_weight and q.enabled and q.is_initialized()):
        return False
    if isinstance(q, AdaRoundQuantizer):
        return not q.soft_targets
    return type(q) is UniformQuantizer


@torch.no_grad()
def _codes(q: nn.Module, weight: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Integer codes, scale, zero point of ``q(weight)``; None if not exactly uniform."""
    wq = q(weight)
    scale = q.quant_params()['scale'].detach()
    zero_point = q.quant_params()['zero_point'].detach()
    codes = torch.round(wq / scale) + zero_point
    qmin, qmax = q.quant_range
    if not torch.isfinite(codes).all() or codes.min() < qmin or codes.max() > qmax:
        return None
    if not torch.equal((codes - zero_point) * scale, wq):
        return None
    return codes.to(torch.int32), scale.clone(), zero_point.clone()


def pack_model(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, int]]:
    """Split the quantized ``model``'s state into float tensors and packed integer weights.

    Returns:
        ``(float_state, packed, storage)``: the state dict without the packed weights and
        their quantizers' state; one entry per packed weight (keyed by its state-dict key);
        byte counts ``packed_bytes``, ``float_bytes``, ``fp32_weight_bytes`` (what the packed
        weights take as float32) and ``num_packed`` / ``num_unpacked`` weight tensors.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    packed: dict[str, dict] = {}
    covered: set[str] = set()
    unpacked = 0
    for name, wrapper, slot, attr in _slots(model):
        q = getattr(wrapper, attr)
        weight = wrapper.float_weight(slot)
        key = f'{_prefix(name)}module.{slot}'
        found = _codes(q, weight.detach()) if _packable(wrapper, q) else None
        if found is None:
            unpacked += 1
            continue
        codes, scale, zero_point = found
        qmin, _ = q.quant_range
        packed[key] = {
            'layer': name, 'slot': slot, 'bits': int(q.bits), 'signed': bool(qmin < 0),
            'shape': list(weight.shape), 'quantizer': type(q).__name__,
            'codes': pack_int(codes.cpu(), q.bits, signed=qmin < 0),
            'scale': scale.cpu(), 'zero_point': zero_point.cpu()}
        covered.add(key)
        covered.update(k for k in state if k.startswith(f'{_prefix(name)}{attr}.'))
    float_state = {k: v for k, v in state.items() if k not in covered}
    storage = {
        'packed_bytes': sum(_nbytes(e) for e in packed.values()),
        'float_bytes': sum(_tensor_bytes(v) for v in float_state.values()),
        'fp32_weight_bytes': sum(4 * math.prod(e['shape']) for e in packed.values()),
        'num_packed': len(packed), 'num_unpacked': unpacked}
    return float_state, packed, storage


def _tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _nbytes(entry: dict) -> int:
    return sum(_tensor_bytes(entry[k]) for k in ('codes', 'scale', 'zero_point'))


def storage_summary(storage: dict[str, int], file_bytes: int | None = None) -> str:
    """One line: file size, packed integer weights vs their float32 size, float rest."""
    packed, fp32 = storage['packed_bytes'], storage['fp32_weight_bytes']
    ratio = f', {fp32 / packed:.1f}x smaller' if packed else ''
    head = f'{file_bytes / MiB:.2f} MiB on disk: ' if file_bytes is not None else ''
    return (f'{head}{storage["num_packed"]} weight tensors packed into {packed / MiB:.2f} MiB '
            f'(float32: {fp32 / MiB:.2f} MiB{ratio}), {storage["num_unpacked"]} kept float, '
            f'other float state {storage["float_bytes"] / MiB:.2f} MiB')


def check_finite(state: dict[str, Any], what: str) -> None:
    """Raise ``FloatingPointError`` naming the first non-finite float tensor of ``state``."""
    for key, value in state.items():
        if isinstance(value, dict):
            check_finite(value, f'{what}[{key!r}]')
        elif isinstance(value, Tensor) and value.is_floating_point() and \
                not bool(torch.isfinite(value).all()):
            raise FloatingPointError(f'{what}: {key!r} has NaN/Inf values; refusing to write '
                                     'a checkpoint (calibration diverged or the data has '
                                     'NaN/Inf)')


def check_fp_weights(model: nn.Module) -> None:
    """Raise ``FloatingPointError`` when a float tensor of the FP model is NaN/Inf.

    Checked once before calibration: NaN weights would otherwise surface units later as
    a calibration failure (or, without a checkpoint to write, as a run with empty results).
    """
    bad = [key for key, value in model.state_dict().items()
           if isinstance(value, Tensor) and value.is_floating_point()
           and not bool(torch.isfinite(value).all())]
    if bad:
        more = f' and {len(bad) - 1} more tensor(s)' if len(bad) > 1 else ''
        raise FloatingPointError(
            f'the FP model has NaN/Inf values in {bad[0]!r}{more} before calibration: the '
            'checkpoint loaded into the detector is broken (e.g. saved from a diverged '
            'training run); load a checkpoint with finite weights')


def check_fp_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = True,
                        logger: logging.Logger | None = None) -> list[str]:
    """Compare the FP checkpoint ``path`` with ``model`` (before quantization).

    mmengine's Runner loads ``load_from`` non-strictly: a checkpoint of another detector
    leaves layers at their random init with only a log warning, and calibrating that model
    gives AP 0. Keys are compared as the Runner loads them (``state_dict`` of the file,
    ``module.`` prefix removed; a missing ``num_batches_tracked`` is fine).

    Args:
        model: the float detector the checkpoint was loaded into.
        path: the checkpoint file.
        strict: raise on any difference; False logs a warning instead.
        logger: where the warning goes (default: the current MMLogger).

    Returns:
        The problems found (empty when the checkpoint fits).

    Raises:
        ValueError: with ``strict``, missing / unexpected keys or shape mismatches, named.
    """
    ckpt = load_checkpoint_file(path, map_location='cpu')
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f'FP checkpoint {str(path)!r} holds no state_dict')
    state = {re.sub(r'^module\.', '', k): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the '
              'model' for k in own if k in state and isinstance(state[k], Tensor)
              and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f'{len(keys)} {what} key(s) {keys[:5]}{" ..." if len(keys) > 5 else ""}'
                for what, keys in (('missing', missing), ('unexpected', unexpected),
                                   ('shape-mismatched', shapes)) if keys]
    if problems:
        msg = (f'FP checkpoint {str(path)!r} does not fit the {type(model).__name__} of this '
               f'config: {"; ".join(problems)}. The Runner loads it non-strictly, so those '
               'layers would keep their random init and calibration would quantize a broken '
               'model; use the checkpoint trained with this config')
        if strict:
            raise ValueError(msg + ' (strict=False in RegPTQHook only warns)')
        (logger or MMLogger.get_current_instance()).warning(msg)
    return problems


def save_quantized(model: nn.Module, path: str | Path, meta: dict[str, Any], *,
                   pack: bool = True, logger: logging.Logger | None = None) -> Path:
    """Write the quantized model atomically (temp file + rename) and log its size.

    Args:
        model: a quantized (and calibrated) model.
        path: target file.
        meta: what the checkpoint was made with (``quant``, ``method``, ``config``, ...).
        pack: store quantized weights as packed integers (format 2); False writes the full
            float state dict (format 1).
        logger: where the size line goes (default: the current MMLogger).

    Raises:
        FloatingPointError: a tensor of the state is NaN/Inf (nothing is written).
    """
    logger = logger or MMLogger.get_current_instance()
    if pack:
        float_state, packed, storage = pack_model(model)
    else:
        float_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        packed, storage = {}, {'packed_bytes': 0, 'fp32_weight_bytes': 0, 'num_packed': 0,
                               'num_unpacked': 0, 'float_bytes': sum(
                                   _tensor_bytes(v) for v in float_state.values())}
    check_finite(float_state, str(path))
    for key, entry in packed.items():
        check_finite({'scale': entry['scale'], 'zero_point': entry['zero_point']},
                     f'{path} [{key!r}]')
    ckpt = {'state_dict': float_state, 'meta': {
        **meta, 'format_version': FORMAT_VERSION if pack else 1, 'storage': storage}}
    if pack:
        ckpt['packed'] = packed
    path = atomic_save(ckpt, path)
    logger.info(f'quantized checkpoint {path}: '
                f'{storage_summary(storage, path.stat().st_size)}')
    return path


# ---------------------------------------------------------------------------- loading
def read_quantized(path: str | Path) -> dict:
    """Read and validate a quantized checkpoint file (no model involved).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: corrupt, truncated, another kind of file, or an unknown format version.
        UnsafeCheckpointError: the file asks for a Python global outside the allow-list
            (nothing from it runs; :mod:`mmdet_regptq.safe_load`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'quantized_checkpoint={str(path)!r} does not exist')
    try:
        ckpt = load_checkpoint_file(path, map_location='cpu')
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(f'quantized_checkpoint={str(path)!r} cannot be read '
                                     f'(corrupt or not a torch file): {err}') from None
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'meta' not in ckpt:
        raise ValueError(f'quantized_checkpoint={str(path)!r} is not a quantized checkpoint '
                         f"(expected keys 'state_dict' and 'meta')")
    version = ckpt['meta'].get('format_version')
    if version not in _READABLE_VERSIONS:
        raise ValueError(f'quantized_checkpoint={str(path)!r} has format_version={version!r}; '
                         f'allowed: {list(_READABLE_VERSIONS)}')
    if version == 2 and not isinstance(ckpt.get('packed'), dict):
        raise ValueError(f"quantized_checkpoint={str(path)!r} has no 'packed' weights")
    return ckpt


def load_quantized(model: nn.Module, path: str | Path, expect: dict[str, Any] | None = None
                   ) -> dict:
    """Load a quantized checkpoint into an already quantized ``model``.

    The model must come from the same config and policy (``quantize_model`` with the same
    bits); packed weights are unpacked into the float weights and the weight quantizers get
    the stored scales, so predictions are identical to the saved model's.

    Args:
        model: the quantized model (e.g. fresh from ``quantize_model``).
        path: the checkpoint.
        expect: meta values that must match (``{'quant': ..., 'method': ...}``).

    Returns:
        The checkpoint's meta.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: corrupt file, or a layer differs (missing, extra, shape, bits, quantizer)
            or the method/bits it was made with differ; the message names the first layer.
    """
    path = Path(path)
    ckpt = read_quantized(path)
    meta = ckpt['meta']
    packed = ckpt.get('packed', {})
    own = model.state_dict()
    covered = _check_layers(model, own, ckpt['state_dict'], packed, path)
    _check_meta(model, meta, expect or {}, path)
    if not packed:
        model.load_state_dict(ckpt['state_dict'], strict=True)
        return meta
    missing, unexpected = model.load_state_dict(ckpt['state_dict'], strict=False)
    if unexpected or set(missing) - covered:
        raise ValueError(f'{path}: state does not match the model (missing '
                         f'{sorted(set(missing) - covered)[:3]}, unexpected {unexpected[:3]})')
    for name, wrapper, slot, attr in _slots(model):
        entry = packed.get(f'{_prefix(name)}module.{slot}')
        if entry is not None:
            _unpack_into(wrapper, slot, attr, entry, path)
    return meta


def _first_quant_layer(model: nn.Module) -> str:
    return next((name for name, _, _, _ in _slots(model)), '<none>')


def _check_meta(model: nn.Module, meta: dict, expect: dict, path: Path) -> None:
    for key, value in expect.items():
        if meta.get(key) != value:
            raise ValueError(
                f'{path}: made with {key}={meta.get(key)!r}, but this run asks for '
                f'{key}={value!r} (first quantized layer: {_first_quant_layer(model)!r}); '
                f'calibrate again or pass the matching config')


def _check_layers(model: nn.Module, own: dict[str, Tensor], saved: dict[str, Tensor],
                  packed: dict[str, dict], path: Path) -> set[str]:
    """Compare the model with the checkpoint in model order; returns the keys covered by
    packed weights (the weight and its quantizer's state)."""
    slot_of: dict[str, tuple[str, QuantModule, str, str]] = {}
    covered: set[str] = set()
    for name, wrapper, slot, attr in _slots(model):
        key = f'{_prefix(name)}module.{slot}'
        if key in packed:
            slot_of[key] = (name, wrapper, slot, attr)
            covered.add(key)
            covered.update(k for k in own if k.startswith(f'{_prefix(name)}{attr}.'))
    for key in own:
        if key in slot_of:
            name, wrapper, slot, attr = slot_of[key]
            entry, q = packed[key], getattr(wrapper, attr)
            if tuple(entry['shape']) != tuple(own[key].shape):
                raise ValueError(f'{path}: layer {name!r} ({slot}) has shape '
                                 f'{tuple(entry["shape"])} in the checkpoint but '
                                 f'{tuple(own[key].shape)} in the model')
            if entry['bits'] != q.bits:
                raise ValueError(f'{path}: layer {name!r} has {entry["bits"]}-bit weights '
                                 f'({slot}) in the checkpoint but {q.bits}-bit in the model')
            continue
        if key in covered:
            continue
        if key in packed:
            raise ValueError(f'{path}: layer {key.rsplit(".module.", 1)[0]!r} has packed '
                             f'weights in the checkpoint but is not quantized in the model')
        if key not in saved:
            layer = _layer_of(key)
            if key.endswith('.alpha') or '.weight_quantizer.' in key:
                raise ValueError(f'{path}: layer {layer!r}: the model has {key!r}, which the '
                                 'checkpoint lacks (other method or quantizer?)')
            raise ValueError(f'{path}: layer {layer!r} of the model is missing in the '
                             f'checkpoint ({key!r})')
        if tuple(own[key].shape) != tuple(saved[key].shape):
            raise ValueError(f'{path}: layer {_layer_of(key)!r}: {key!r} has shape '
                             f'{tuple(saved[key].shape)} in the checkpoint but '
                             f'{tuple(own[key].shape)} in the model')
    for key in list(saved) + list(packed):
        if key not in own:
            raise ValueError(f'{path}: checkpoint has layer {_layer_of(key)!r} ({key!r}), '
                             'which the model does not')
    return covered


def _layer_of(key: str) -> str:
    """Module name of a state-dict key (``a.b.module.weight`` -> ``a.b``)."""
    parts = key.split('.')[:-1]
    for marker in ('module', 'weight_quantizer', 'input_quantizer', 'out_weight_quantizer',
                   'key_quantizer', 'value_quantizer'):
        if marker in parts:
            return '.'.join(parts[:parts.index(marker)])
    return '.'.join(parts)


@torch.no_grad()
def _unpack_into(wrapper: QuantModule, slot: str, attr: str, entry: dict, path: Path) -> None:
    weight = wrapper.float_weight(slot)
    codes = unpack_int(entry['codes'], entry['bits'], entry['shape'], signed=entry['signed'])
    scale = entry['scale'].to(weight.device, weight.dtype)
    zero_point = entry['zero_point'].to(weight.device, weight.dtype)
    codes = codes.to(weight.device, weight.dtype)
    dequant = (codes - zero_point) * scale
    weight.data.copy_(dequant)
    q = getattr(wrapper, attr)
    if isinstance(q, AdaRoundQuantizer):
        q.scale = scale.clone()
        q.zero_point = zero_point.clone()
        rounding = codes - zero_point - torch.floor(weight / q.scale)
        q.alpha.data = torch.where(rounding > 0.5, 1.0, -1.0).to(q.alpha.dtype)
        q.harden()   # alpha -> +-HARD_ALPHA by its sign, frozen, hard rounding
        q._mark_initialized()
    elif isinstance(q, UniformQuantizer):
        q.scale.data = scale.clone()
        q.zero_point = zero_point.clone()
        q._mark_initialized()
    else:
        raise ValueError(f'{path}: layer {entry["layer"]!r} has a {type(q).__name__} weight '
                         f'quantizer in the model but {entry["quantizer"]} packed weights')
    if not torch.equal(q(weight), dequant):
        raise ValueError(f'{path}: layer {entry["layer"]!r} ({slot}) does not reproduce its '
                         'packed weights; the model quantizer differs from the saved one')
