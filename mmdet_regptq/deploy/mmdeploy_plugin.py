"""MMDeploy plugin: the ``tvm_int4`` / ``tvm_relax`` backends and the raw-output detector.

Importing this module (a deploy config's ``custom_imports=dict(imports=[
'mmdet_regptq.deploy'])``) registers, through mmdeploy 1.3.1's own registries:

- ``BACKEND_MANAGERS.register('tvm_int4')`` → :class:`TVMInt4Manager`: ``to_backend``
  compiles each exported ONNX file with TVM Relax into an artifact directory
  (``model.so`` + bit-packed ``weights.npz`` + ``meta.json``; see ``tvm_build``), the
  quantized Conv/Gemm layers rewritten to integer ops. ``register`` also extends mmdeploy's
  ``Backend`` enum (``Backend.TVM_INT4``) with ``aenum.extend_enum``;
- ``BACKEND_MANAGERS.register('tvm_relax')`` → :class:`TVMRelaxManager`: the same without
  the integer rewrite — the FP32 reference (mmdeploy's own ``tvm`` backend uses Relay,
  which TVM 0.27 no longer has);
- the wrapper :class:`TVMRelaxWrapper` (``BaseWrapper``) in ``BACKEND_WRAPPER`` for both;
- ``'regptq_raw'`` in mmdeploy's detection backend-model registry
  (``codebase_config.model_type='regptq_raw'``): :class:`RawOutputDetector` runs a backend
  graph that returns the raw head outputs (``raw{i}_{j}``, see ``detector.py``) and decodes
  them with mmdet's ``bbox_head.predict_by_feat`` (NMS in PyTorch), as mmdeploy's RKNN
  model does. A two-stage detector is two graphs with mmdet's RPN decoding, NMS and
  RoIAlign between them (``two_stage.py``). Any backend (onnxruntime, tvm_int4, tvm_relax)
  works with it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from mmdeploy.backend.base import BACKEND_MANAGERS, BACKEND_WRAPPER, BaseBackendManager, \
    BaseWrapper

from mmdet_regptq.deploy.detector import unflatten_raw

__all__ = ['TVMInt4Manager', 'TVMRelaxManager', 'TVMRelaxWrapper', 'RawOutputDetector',
           'regptq_options']

logger = logging.getLogger(__name__)


def regptq_options(deploy_cfg: Any) -> dict:
    """The deploy config's ``regptq`` section (our export options) with defaults.

    Keys: ``int4_weights`` (store <= 4-bit weights as ONNX INT4, default True),
    ``onnx_format`` (``'qdq'`` | ``'ort_int8'`` | ``'tensorrt'``), ``calib_images`` (images
    for the ORT INT8 output ranges, default 4), ``require_quantized`` (refuse a float
    checkpoint, default False), ``num_rois`` (two-stage detectors: RoIs per call of the RoI
    graph; default 0 = the model's ``test_cfg.rpn.max_per_img``).
    """
    opts = dict(int4_weights=True, onnx_format='qdq', calib_images=4, require_quantized=False,
                num_rois=0)
    given = dict((deploy_cfg or {}).get('regptq', {}) or {})
    unknown = sorted(set(given) - set(opts))
    if unknown:
        raise KeyError(f'regptq: unknown field(s) {unknown}; allowed: {sorted(opts)}')
    opts.update(given)
    if opts['onnx_format'] not in ('qdq', 'ort_int8', 'tensorrt'):
        raise ValueError(f"regptq.onnx_format={opts['onnx_format']!r}; allowed: "
                         "'qdq', 'ort_int8', 'tensorrt'")
    return opts


class TVMRelaxWrapper(BaseWrapper):
    """Runs a TVM Relax artifact (``model.so``, ``weights.npz``, ``meta.json``) on the CPU.

    Args:
        backend_files: the artifact files (any one locates the directory).
        output_names: output order (default: the artifact's).
    """

    def __init__(self, backend_files: Sequence[str], output_names: Optional[Sequence[str]] = None
                 ) -> None:
        from mmdet_regptq.deploy.tvm_build import TvmRunner

        files = [backend_files] if isinstance(backend_files, (str, Path)) else list(backend_files)
        self.runner = TvmRunner(files[0])
        super().__init__(list(output_names) if output_names else self.runner.output_names)

    @staticmethod
    def get_backend_file_count() -> int:
        return 3

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outs = self.runner({k: v for k, v in inputs.items()})
        return {name: torch.from_numpy(outs[name]) for name in self.output_names}


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

        from mmdet_regptq.deploy.tvm_build import build_artifact, host_target

        if device != 'cpu':
            raise NotImplementedError(f'{cls.backend_name}: device={device!r}; only cpu')
        backend_cfg = dict((deploy_cfg or {}).get('backend_config', {}) or {})
        target = host_target(backend_cfg.get('mcpu'))
        files: list[str] = []
        for ir_file in ir_files:
            out_dir = Path(work_dir) / f'{Path(ir_file).stem}_{cls.backend_name}'
            built, report = build_artifact(onnx.load(ir_file), out_dir,
                                           integer=backend_cfg.get('integer', cls.integer),
                                           target=target)
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


def ort_session_options(threads: int = 0) -> Any:
    """ONNX Runtime session options whose idle worker threads do not spin between runs
    (:func:`stop_ort_spinning` says why); ``threads`` = intra-op threads, 0 = ORT's default.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return options


def stop_ort_spinning(wrapper: Any, onnx_file: str) -> bool:
    """Rebuild an mmdeploy ``ORTWrapper``'s session with ORT's idle worker threads not
    spinning; returns whether it was one.

    Why: a two-stage deployment runs two sessions with PyTorch host steps between them;
    spinning workers of one take the cores from the others. Measured on the bundled Faster
    R-CNN at 2 threads, 512²: 131-134 / 119-122 ms (FP32 / INT8 ORT) spinning, 61-79 /
    48-60 ms not (``benchmarks/deploy.py --threads 2``). Values do not change. mmdeploy's
    ``ORTWrapper`` takes no session options, so the session it built is built once more.
    """
    from mmdeploy.backend.onnxruntime.wrapper import ORTWrapper

    if not isinstance(wrapper, ORTWrapper):
        return False
    import onnxruntime as ort

    wrapper.sess = ort.InferenceSession(onnx_file, ort_session_options(),
                                        providers=wrapper.sess.get_providers())
    wrapper.io_binding = wrapper.sess.io_binding()
    return True


def _register_raw_detector() -> type:
    from mmdeploy.codebase.mmdet.deploy import object_detection_model as odm

    registry = getattr(odm, '__BACKEND_MODEL')

    class RawOutputDetector(odm.End2EndModel):
        """Backend graph(s) of raw head outputs + mmdet's own decoding in PyTorch.

        Single-stage: one graph, then ``bbox_head.predict_by_feat``. Two-stage (the model
        config has ``rpn_head`` and ``roi_head``): the backend files of two graphs (image →
        features + RPN outputs; RoI features → box head outputs), joined by
        :class:`~mmdet_regptq.deploy.two_stage.TwoStageHost`. Inputs are zero-padded
        (bottom/right) to the graph's static shape, the way mmdet pads a batch, so any
        test-pipeline image up to that size runs.
        """

        def __init__(self, backend: Any, backend_files: Sequence[str], device: str,
                     deploy_cfg: Any, model_cfg: Any = None, **kwargs: Any) -> None:
            from mmdeploy.utils import get_input_shape, load_config
            from mmdet.registry import MODELS

            from mmdet_regptq.deploy.two_stage import TwoStageHost, num_rois_of

            model_cfg = load_config(model_cfg)[0]
            super().__init__(backend, backend_files, device, deploy_cfg, model_cfg=model_cfg,
                             **kwargs)
            self.test_cfg = model_cfg.model.get('test_cfg')
            self.static_shape = get_input_shape(deploy_cfg)  # [W, H] or None
            if self.two_stage:
                num_rois = num_rois_of(model_cfg, regptq_options(deploy_cfg)['num_rois'])
                self.host = TwoStageHost(MODELS.build(model_cfg.model), num_rois)
                return
            head_cfg = dict(model_cfg.model.bbox_head)
            head_cfg.update(train_cfg=model_cfg.model.get('train_cfg'),
                            test_cfg=model_cfg.model.get('test_cfg'))
            self.head = MODELS.build(head_cfg).eval()

        @property
        def two_stage(self) -> bool:
            from mmdet_regptq.deploy.two_stage import is_two_stage
            return is_two_stage(self.model_cfg.model)

        def _init_wrapper(self, backend: Any, backend_files: Sequence[str], device: str) -> None:
            from mmdeploy.codebase.base import BaseBackendModel

            from mmdet_regptq.deploy.two_stage import ROI_INPUT

            files = list(backend_files)
            graphs = [(files, self.input_name)]
            if self.two_stage:
                if len(files) % 2:
                    raise ValueError(f'a two-stage detector needs the files of two graphs, '
                                     f'got {len(files)}: {files}')
                half = len(files) // 2
                graphs = [(files[:half], self.input_name), (files[half:], ROI_INPUT)]
            wrappers = [BaseBackendModel._build_wrapper(
                backend=backend, backend_files=part, device=device, input_names=[name],
                output_names=None, deploy_cfg=self.deploy_cfg) for part, name in graphs]
            if self.two_stage:
                for wrapper, (part, _) in zip(wrappers, graphs):
                    stop_ort_spinning(wrapper, part[0])
            self.wrapper = wrappers[0]
            self.roi_wrapper = wrappers[1] if len(wrappers) > 1 else None

        def _padded(self, inputs: torch.Tensor) -> torch.Tensor:
            if self.static_shape:
                w, h = self.static_shape
                if inputs.shape[-2] > h or inputs.shape[-1] > w:
                    raise ValueError(f'input {tuple(inputs.shape[-2:])} is larger than the '
                                     f'static shape {(h, w)} of the deployed graph')
                inputs = F.pad(inputs, (0, w - inputs.shape[-1], 0, h - inputs.shape[-2]))
            return inputs.contiguous()

        def raw_outputs(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            """The (first) graph's named outputs."""
            return self.wrapper({self.input_name: self._padded(inputs)})

        def raw_forward(self, inputs: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
            """Backend outputs in ``_forward``'s structure (per-level lists); two-stage:
            ``(features, rpn scores, rpn deltas)``."""
            return unflatten_raw(self.raw_outputs(inputs))

        def roi_forward(self, roi_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Two-stage: the RoI graph on ``[num_rois, C, h, w]`` RoI features."""
            from mmdet_regptq.deploy.two_stage import ROI_INPUT

            if self.roi_wrapper is None:
                raise RuntimeError('roi_forward: this deployment has no RoI graph')
            outs = self.roi_wrapper({ROI_INPUT: roi_feats.contiguous()})
            (scores,), (deltas,) = unflatten_raw(outs)
            return scores, deltas

        def forward(self, inputs: torch.Tensor, data_samples: Any = None, mode: str = 'predict',
                    **kwargs: Any) -> Any:
            assert mode == 'predict', 'deployed models only predict'
            if self.two_stage:
                results = self.host.predict(self.raw_outputs(inputs), self.roi_forward,
                                            data_samples, rescale=True)
            else:
                raw = self.raw_forward(inputs)
                metas = [s.metainfo for s in data_samples]
                with torch.no_grad():
                    results = self.head.predict_by_feat(*raw, batch_img_metas=metas,
                                                        cfg=self.test_cfg, rescale=True)
            for sample, result in zip(data_samples, results):
                sample.pred_instances = result
            return data_samples

    if 'regptq_raw' not in registry.module_dict:
        registry.register_module('regptq_raw', module=RawOutputDetector)
    return registry.get('regptq_raw')


RawOutputDetector = _register_raw_detector()
