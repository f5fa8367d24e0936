"""The deploy config's ``regptq`` section: our export options, with defaults and checks."""
from __future__ import annotations

from typing import Any

__all__ = ['regptq_options']


def regptq_options(deploy_cfg: Any) -> dict:
    """The deploy config's ``regptq`` section (our export options) with defaults.

    Keys: ``int4_weights`` (store <= 4-bit weights as ONNX INT4, default True),
    ``onnx_format`` (``'qdq'`` | ``'ort_int8'`` | ``'tensorrt'``), ``calib_images`` (images
    for the ORT INT8 output ranges, default 4), ``require_quantized`` (refuse a float
    checkpoint, default False), ``num_rois`` (two-stage detectors: RoIs per call of the RoI
    graph; default 0 = the model's ``test_cfg.rpn.max_per_img``), ``target_cpu`` (the CPU
    an ``'ort_int8'`` model will run on: ``'host'`` = the build machine, default;
    ``'avx2'`` = any x86 CPU, also without VNNI; ``'vnni'`` = with AVX-512 VNNI / AVX-VNNI;
    see ``mmdet_regptq.deploy.onnx.ort_int8``).
    """
    from mmdet_regptq.deploy.onnx.ort_int8 import TARGET_CPUS

    opts = dict(int4_weights=True, onnx_format='qdq', calib_images=4, require_quantized=False,
                num_rois=0, target_cpu='host')
    given = dict((deploy_cfg or {}).get('regptq', {}) or {})
    unknown = sorted(set(given) - set(opts))
    if unknown:
        raise KeyError(f'regptq: unknown field(s) {unknown}; allowed: {sorted(opts)}')
    opts.update(given)
    if opts['onnx_format'] not in ('qdq', 'ort_int8', 'tensorrt'):
        raise ValueError(f"regptq.onnx_format={opts['onnx_format']!r}; allowed: "
                         "'qdq', 'ort_int8', 'tensorrt'")
    if opts['target_cpu'] not in TARGET_CPUS:
        raise ValueError(f"regptq.target_cpu={opts['target_cpu']!r}; allowed: "
                         f'{", ".join(map(repr, TARGET_CPUS))}')
    return opts
