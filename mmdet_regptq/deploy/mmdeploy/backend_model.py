"""``regptq_raw``: mmdeploy's detection backend model for graphs of raw head outputs.

Registered in mmdeploy's detection backend-model registry
(``codebase_config.model_type='regptq_raw'``): :class:`RawOutputDetector` runs a backend
graph that returns the raw head outputs (``raw{i}_{j}``, ``detectors/raw.py``) and decodes
them with mmdet's ``bbox_head.predict_by_feat`` (NMS in PyTorch), as mmdeploy's RKNN model
does. A two-stage detector is two graphs with mmdet's RPN decoding, NMS and RoIAlign
between them (``detectors/two_stage.py``). Any backend (onnxruntime, tvm_int4, tvm_relax)
works with it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from mmdeploy.codebase.mmdet.deploy import object_detection_model as odm
from mmdeploy.codebase.mmdet.deploy.object_detection_model import End2EndModel

from mmdet_regptq.deploy.detectors.raw import unflatten_raw
from mmdet_regptq.deploy.mmdeploy.options import regptq_options
from mmdet_regptq.deploy.onnx.session import ort_session_options

__all__ = ['RawOutputDetector', 'stop_ort_spinning']


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


class RawOutputDetector(End2EndModel):
    """Backend graph(s) of raw head outputs + mmdet's own decoding in PyTorch.

    Single-stage: one graph, then ``bbox_head.predict_by_feat``. Two-stage (the model
    config has ``rpn_head`` and ``roi_head``): the backend files of two graphs (image →
    features + RPN outputs; RoI features → box head outputs), joined by
    :class:`~mmdet_regptq.deploy.detectors.two_stage.TwoStageHost`. Inputs are zero-padded
    (bottom/right) to the graph's static shape, the way mmdet pads a batch, so any
    test-pipeline image up to that size runs.
    """

    def __init__(self, backend: Any, backend_files: Sequence[str], device: str,
                 deploy_cfg: Any, model_cfg: Any = None, **kwargs: Any) -> None:
        from mmdeploy.utils import get_input_shape, load_config
        from mmdet.registry import MODELS

        from mmdet_regptq.deploy.detectors.two_stage import TwoStageHost, num_rois_of

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
        from mmdet_regptq.deploy.detectors.two_stage import is_two_stage
        return is_two_stage(self.model_cfg.model)

    def _init_wrapper(self, backend: Any, backend_files: Sequence[str], device: str) -> None:
        from mmdeploy.codebase.base import BaseBackendModel

        from mmdet_regptq.deploy.detectors.two_stage import ROI_INPUT

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
        from mmdet_regptq.deploy.detectors.two_stage import ROI_INPUT

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


_REGISTRY = getattr(odm, '__BACKEND_MODEL')
if 'regptq_raw' not in _REGISTRY.module_dict:
    _REGISTRY.register_module('regptq_raw', module=RawOutputDetector)
RawOutputDetector = _REGISTRY.get('regptq_raw')  # noqa: F811  (the registered class)
