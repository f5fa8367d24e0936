"""MMDeploy backend managers ``tvm_int4`` / ``tvm_relax`` and their wrapper.

Registered through mmdeploy 1.3.1's own registries: ``BACKEND_MANAGERS.register(name)``
(which also extends mmdeploy's ``Backend`` enum, ``Backend.TVM_INT4``, with
``aenum.extend_enum``) and ``BACKEND_WRAPPER``. ``to_backend`` compiles each exported ONNX
file into an artifact directory (``model.so`` + bit-packed ``weights.npz`` + ``meta.json``;
``deploy/tvm/build.py``); ``tvm_relax`` is the same without the integer rewrite, the FP32
reference (mmdeploy's own ``tvm`` backend uses Relay, which TVM 0.27 no longer has).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from mmdeploy.backend.base import BACKEND_MANAGERS, BACKEND_WRAPPER, BaseBackendManager, \
    BaseWrapper

__all__ = ['TVMInt4Manager', 'TVMRelaxManager', 'TVMRelaxWrapper']

logger = logging.getLogger(__name__)


class TVMRelaxWrapper(BaseWrapper):
    """Runs a TVM Relax artifact (``model.so``, ``weights.npz``, ``meta.json``) on the CPU.

    When asked for ``dets`` / ``labels`` (an end-to-end deploy config) and the work dir
    holds the end-to-end ``spec.json``, the artifact's raw outputs go through the NumPy
    post-processor (a two-stage detector: its two artifacts with the NumPy steps between
    them, ``runtime/two_stage.py``) and the wrapper returns MMDeploy's ``dets [1, N, 5]`` /
    ``labels [1, N]``.

    Args:
        backend_files: the artifact files (any one of the first artifact locates it).
        output_names: output order (default: the artifact's).
    """

    def __init__(self, backend_files: Sequence[str], output_names: Optional[Sequence[str]] = None
                 ) -> None:
        from mmdet_regptq.deploy.tvm.runner import TvmRunner

        files = [backend_files] if isinstance(backend_files, (str, Path)) else list(backend_files)
        self.end2end = None
        if output_names and list(output_names)[:2] == ['dets', 'labels']:
            self.end2end = _end2end_pipeline(Path(files[0]))
            super().__init__(list(output_names))
            return
        self.runner = TvmRunner(files[0])
        super().__init__(list(output_names) if output_names else self.runner.output_names)

    @staticmethod
    def get_backend_file_count() -> int:
        return 3

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.end2end is not None:
            (value,) = inputs.values()
            value = value.detach().cpu().numpy() if hasattr(value, 'detach') else value
            dets, labels = self.end2end(value)
            return {'dets': torch.from_numpy(dets)[None], 'labels': torch.from_numpy(labels)[None]}
        outs = self.runner({k: v for k, v in inputs.items()})
        return {name: torch.from_numpy(outs[name]) for name in self.output_names}


def _end2end_pipeline(artifact_file: Path) -> Any:
    """Image → ``(dets, labels)`` of the end-to-end work dir around an artifact (its
    ``spec.json``; ``runtime.detector.tvm_end2end``)."""
    import json

    from mmdet_regptq.deploy.runtime.detector import tvm_end2end

    directory = artifact_file if artifact_file.is_dir() else artifact_file.parent
    spec_file = directory.parent / 'spec.json'
    if not spec_file.exists():
        raise FileNotFoundError(f'{spec_file}: an end-to-end TVM deployment needs the '
                                'spec.json written by its export')
    return tvm_end2end(directory.parent, json.loads(spec_file.read_text()))


class _TVMManagerBase(BaseBackendManager):
    """Shared manager code; subclasses set ``integer``."""

    integer = True

    @classmethod
    def build_wrapper(cls, backend_files: Sequence[str], device: str = 'cpu',
                      input_names: Optional[Sequence[str]] = None,
                      output_names: Optional[Sequence[str]] = None,
                      deploy_cfg: Optional[Any] = None, **kwargs: Any) -> TVMRelaxWrapper:
        if device != 'cpu':
            raise NotImplementedError(f'{cls.backend_name}: device={device!r}; only the CPU '
                                      '(llvm) target is built')
        return TVMRelaxWrapper(backend_files, output_names=output_names)

    @classmethod
    def is_available(cls, with_custom_ops: bool = False) -> bool:
        try:
            import tvm  # noqa: F401
            from tvm.relax.frontend.onnx import from_onnx  # noqa: F401
        except ImportError:
            return False
        return True

    @classmethod
    def get_version(cls) -> str:
        if not cls.is_available():
            return 'None'
        import tvm
        return str(tvm.__version__)

    @classmethod
    def to_backend(cls, ir_files: Sequence[str], work_dir: str, deploy_cfg: Any,
                   log_level: int = logging.INFO, device: str = 'cpu',
                   **kwargs: Any) -> Sequence[str]:
        """Compile every ONNX file into ``work_dir/<stem>_<backend>/`` (module doc)."""
        import onnx

        from mmdet_regptq.deploy.mmdeploy.options import regptq_options
        from mmdet_regptq.deploy.tvm.build import build_artifact, deploy_target

        if device != 'cpu':
            raise NotImplementedError(f'{cls.backend_name}: device={device!r}; only cpu')
        backend_cfg = dict((deploy_cfg or {}).get('backend_config', {}) or {})
        # backend_config.mcpu (an LLVM CPU name) or regptq.target_cpu ('host' / 'avx2' /
        # 'vnni'): the CPU the artifact is compiled for, which picks its int8 kernel
        target = deploy_target(backend_cfg.get('mcpu'),
                               regptq_options(deploy_cfg).get('target_cpu', 'host'))
        files: list[str] = []
        for ir_file in ir_files:
            out_dir = Path(work_dir) / f'{Path(ir_file).stem}_{cls.backend_name}'
            built, report = build_artifact(onnx.load(ir_file), out_dir,
                                           integer=backend_cfg.get('integer', cls.integer),
                                           target=target,
                                           kernel=backend_cfg.get('int8_kernel', 'auto'),
                                           # SiLU's sigmoid on fast_exp (tvm/fast_sigmoid.py)
                                           fast_sigmoid=bool(backend_cfg.get('fast_sigmoid',
                                                                             False)))
            if report is not None:
                logger.info('%s: %s', cls.backend_name, report.summary())
            files += built
        return files


@BACKEND_MANAGERS.register('tvm_int4')
class TVMInt4Manager(_TVMManagerBase):
    """``tvm_int4``: quantized layers in integers, weights bit-packed (module doc)."""

    integer = True


@BACKEND_MANAGERS.register('tvm_relax')
class TVMRelaxManager(_TVMManagerBase):
    """``tvm_relax``: the exported graph compiled as it is (FP32 reference)."""

    integer = False


for _name in ('tvm_int4', 'tvm_relax'):
    if _name not in BACKEND_WRAPPER.module_dict:
        BACKEND_WRAPPER.register_module(_name, module=TVMRelaxWrapper)
