"""Load a TVM artifact directory and run it on the CPU (NumPy + TVM only, no torch).

The artifact (``model.so``, ``weights.npz``, ``meta.json``) is what
:func:`mmdet_regptq.deploy.tvm.build.build_artifact` writes; the packed integer weights
are unpacked once at load (:mod:`mmdet_regptq.deploy.tvm.packed`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mmdet_regptq.deploy.tvm.avx2 import MAX_WEIGHT as AVX2_MAX_WEIGHT
from mmdet_regptq.deploy.tvm.packed import unpack_weight

__all__ = ['TvmRunner', 'ARTIFACT_FILES', 'check_avx2_weight']

ARTIFACT_FILES = ('model.so', 'weights.npz', 'meta.json')


def check_avx2_weight(name: str, value: np.ndarray, limit: int = AVX2_MAX_WEIGHT) -> None:
    """Refuse a weight the AVX2 kernel would compute wrongly: a ``weights.npz`` that does
    not match the build. ``limit``: the ``max |w|`` the layer's kernel was built for (64
    when each step's int16 pair sums are widened at once, less when several are added in
    int16 first, ``meta.json``'s ``avx2_weight_limits``)."""
    peak = int(np.abs(value.astype(np.int64)).max(initial=0))
    if peak > limit:
        raise ValueError(f'weight {name}: max |w| = {peak} > {limit}, but the artifact runs '
                         f'it on the AVX2 kernel built for |w| <= {limit} (int16 sums); '
                         'rebuild the artifact from these weights')


class TvmRunner:
    """Load an artifact directory and run it on the CPU.

    Args:
        artifact: the directory, or any of its three files.
    """

    def __init__(self, artifact: str | Path) -> None:
        import tvm
        from tvm import relax

        path = Path(artifact)
        directory = path if path.is_dir() else path.parent
        self.meta = json.loads((directory / 'meta.json').read_text())
        self.device = tvm.cpu()
        lib = tvm.runtime.load_module(str(directory / 'model.so'))
        self.vm = relax.VirtualMachine(lib, self.device)
        stored = np.load(directory / 'weights.npz')
        kernels = self.meta.get('kernels') or {}
        limits = self.meta.get('avx2_weight_limits') or {}
        self.weights = []
        for i, wmeta in enumerate(self.meta['weights']):
            value = unpack_weight(stored[f'w{i}.words'], stored[f'w{i}.zero_point'], wmeta)
            if kernels.get(wmeta['name']) == 'avx2_int8':
                check_avx2_weight(wmeta['name'], value,
                                  limits.get(wmeta['name'], AVX2_MAX_WEIGHT))
            self.weights.append(tvm.runtime.tensor(value, self.device))
        if self.meta.get('transform_params'):
            # weight layout changes (e.g. the VNNI blocking), once, at load
            self.weights = list(self.vm['main_transform_params'](self.weights))
        self.input_names = list(self.meta['inputs'])
        self.output_names = list(self.meta['outputs'])

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        import tvm

        args = []
        for name in self.input_names:
            value = inputs[name]
            value = value.detach().cpu().numpy() if hasattr(value, 'detach') else value
            args.append(tvm.runtime.tensor(np.ascontiguousarray(value, np.float32),
                                           self.device))
        out = self.vm['main'](*args, *self.weights)
        outs = [out] if hasattr(out, 'numpy') else list(out)
        return {name: _view(o) for name, o in zip(self.output_names, outs)}


def _view(tensor: Any) -> np.ndarray:
    """A read-only NumPy view of a VM output (DLPack, no copy): copying RetinaNet's
    7.9 MB of raw head outputs into fresh arrays took ~1.1 ms per run. The view keeps the
    tensor (and its storage) alive; the VM allocates each run's outputs anew, so a later
    run does not overwrite it. Read-only in case an output is a compiled-in constant."""
    array = np.from_dlpack(tensor)
    array.flags.writeable = False
    return array
