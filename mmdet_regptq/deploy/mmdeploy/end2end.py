"""End-to-end deployment (``codebase_config.model_type='end2end'``): one artifact per
detector that runs without torch or mmdet.

- ``onnxruntime`` (FP32 or ``onnx_format='ort_int8'``) and ``tensorrt``: one ONNX graph
  image → ``dets`` + ``labels`` (``deploy/detectors/end2end.py`` /
  ``two_stage_graph.py``), quantized layers as Q/DQ exactly as in the raw export;
- ``tvm_int4`` / ``tvm_relax``: TVM 0.27's Relax ONNX frontend converts ``TopK``,
  ``NonZero``, ``NonMaxSuppression`` and ``RoiAlign``, and a dense end-to-end graph
  compiles with TVM's default lowering, but not with this backend's CPU schedules (they
  fail on the post-processing's gather functions), and ``RoiAlign`` on a data-dependent
  number of RoIs does not compile ("CodeGenVM cannot emit this Relax operator"). So the
  TVM artifact holds the network up to the raw head outputs and the NumPy post-processor
  (``deploy/runtime/postprocess.py``) does the rest, from ``spec.json`` + ``priors.npz``.
  A two-stage detector is two TVM artifacts (graph 1: features + RPN outputs; graph 2: the
  box head on a static RoI count, both as in the two-graph deployment) and the NumPy RPN
  proposals, RoIAlign and box decoding + NMS (``deploy/runtime/two_stage.py``) around them.

Every work dir gets ``spec.json`` (preprocessing, backend, model file, classes), which
``python -m mmdet_regptq.deploy.run`` reads, and ``reference_end2end.npz``: the fake-quant
model's own detections on the export image, against which the backend is checked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from mmdet_regptq.deploy.detectors.end2end import END2END_OUTPUTS, DenseEnd2End
from mmdet_regptq.deploy.detectors.spec import (PRIORS_FILE, postprocess_spec,
                                                preprocess_spec, static_letterbox,
                                                two_stage_postprocess_spec, write_spec)
from mmdet_regptq.deploy.detectors.two_stage import is_two_stage, num_rois_of
from mmdet_regptq.deploy.detectors.two_stage_graph import TwoStageEnd2End
from mmdet_regptq.deploy.detectors.yolov5_graph import YOLOv5End2End, is_yolov5
from mmdet_regptq.deploy.mmdeploy.pipeline import (DeployResult, PreparedExport,
                                                   apply_onnx_format, convert_to_backend,
                                                   export_detector, prepare_export)
from mmdet_regptq.deploy.onnx.export import export_onnx

__all__ = ['is_end2end', 'export_end2end', 'end2end_graph', 'REFERENCE_FILE', 'TVM_BACKENDS']

REFERENCE_FILE = 'reference_end2end.npz'
TVM_BACKENDS = ('tvm_int4', 'tvm_relax')


def is_end2end(deploy_cfg: Any) -> bool:
    """Whether a deploy config asks for an end-to-end deployment."""
    codebase = dict((deploy_cfg or {}).get('codebase_config', {}) or {})
    return codebase.get('model_type', 'end2end') in ('end2end', 'regptq_end2end')


def end2end_graph(model: torch.nn.Module, input_shape: tuple[int, int], nms: str = 'onnx'
                  ) -> torch.nn.Module:
    """The end-to-end module of a (quantized) detector, in eval mode."""
    cls = TwoStageEnd2End if is_two_stage(model) else \
        YOLOv5End2End if is_yolov5(model) else DenseEnd2End
    return cls(model, input_shape, nms=nms).eval()


def _classes(model: torch.nn.Module, model_cfg: Any) -> Any:
    """Class names: the checkpoint's ``dataset_meta``, the config's ``metainfo``, or the
    test dataset class's ``METAINFO`` (e.g. ``CocoDataset``'s 80 names)."""
    from mmdet.registry import DATASETS

    meta = getattr(model, 'dataset_meta', None) or {}
    classes = meta.get('classes') or model_cfg.get('metainfo', {}).get('classes')
    dataset = model_cfg.get('test_dataloader', {}).get('dataset', {})
    cls = DATASETS.get(dataset.get('type', '')) if not classes and dataset else None
    return classes or getattr(cls, 'METAINFO', {}).get('classes')


def _spec(prep: PreparedExport, backend: str, input_shape: tuple[int, int]) -> dict:
    classes = _classes(prep.model, prep.model_cfg)
    return dict(backend=backend, preprocess=preprocess_spec(prep.model_cfg, input_shape),
                classes=list(classes) if classes else None)


def _export_tvm(prep: PreparedExport, backend: str, input_shape: tuple[int, int],
                img: Any, device: str) -> tuple[DeployResult, dict, list]:
    # the raw graph(s): a two-stage detector's graph 1 (features + RPN outputs) and
    # graph 2 (the box head on a static RoI count), exactly as the two-graph deployment
    result = export_detector(prep.deploy_cfg, prep.model_cfg, None, img, prep.work_dir,
                             device, model=prep.model)
    spec = _spec(prep, backend, input_shape)
    spec.update(model=f'{Path(result.onnx_file).stem}_{backend}', priors=PRIORS_FILE)
    if is_two_stage(prep.model):
        post, priors = two_stage_postprocess_spec(
            prep.model, input_shape, num_rois_of(prep.model_cfg, prep.opts['num_rois']))
        spec['roi_model'] = f'{Path(result.onnx_files[1]).stem}_{backend}'
    else:
        post, priors = postprocess_spec(prep.model, input_shape)
    spec['postprocess'] = post
    return result, spec, priors


def export_end2end(deploy_cfg: Any, model_cfg: Any, checkpoint: str | None, img: Any,
                   work_dir: str | Path, device: str = 'cpu',
                   model: torch.nn.Module | None = None) -> DeployResult:
    """Export the end-to-end artifact's ONNX file and ``spec.json`` (module doc).

    Returns:
        :class:`DeployResult`; for the TVM backends the ONNX file is the raw graph that
        ``to_backend`` compiles.
    """
    from mmdeploy.utils import get_backend, get_input_shape, get_onnx_config, load_config

    deploy_cfg, model_cfg = load_config(deploy_cfg, model_cfg)
    shape = get_input_shape(deploy_cfg)     # [W, H]
    if shape:   # a letterbox pads to the static shape, as the runtime does
        model_cfg = static_letterbox(model_cfg, (shape[1], shape[0]))
    prep = prepare_export(deploy_cfg, model_cfg, checkpoint, img, work_dir, device, model)
    if not prep.shape:
        raise ValueError('onnx_config.input_shape must be set: the end-to-end graph is static')
    input_shape = (int(prep.shape[1]), int(prep.shape[0]))
    backend = get_backend(prep.deploy_cfg).value
    graph = end2end_graph(prep.model, input_shape)
    with torch.no_grad():
        ref_dets, ref_labels = graph(prep.inputs)
    np.savez(prep.work_dir / REFERENCE_FILE, input=prep.inputs.numpy(),
             dets=ref_dets.numpy(), labels=ref_labels.numpy())
    if backend in TVM_BACKENDS:
        result, spec, priors = _export_tvm(prep, backend, input_shape, img, device)
        write_spec(prep.work_dir, spec, priors)
        return result
    onnx_cfg = get_onnx_config(prep.deploy_cfg)
    path = str(prep.work_dir / onnx_cfg.get('save_file', 'end2end.onnx'))
    if backend == 'tensorrt':
        graph = end2end_graph(prep.model, input_shape, nms='tensorrt')
    report = export_onnx(graph, prep.inputs, path,
                         input_names=[list(onnx_cfg.get('input_names', ['input']))[0]],
                         output_names=list(END2END_OUTPUTS),
                         opset=onnx_cfg.get('opset_version', 21),
                         int4_weights=prep.opts['int4_weights'],
                         dynamic_axes=None if backend == 'tensorrt' else
                         {name: {1: 'num_dets'} for name in END2END_OUTPUTS})
    result = DeployResult(onnx_file=path, onnx_files=[path], export=report)
    apply_onnx_format(prep, [(path, 'input', lambda x, m: x)], result)
    if backend == 'tensorrt':
        _static_output_shapes(path, graph.max_per_img)
    result.notes.append(f'end-to-end export: {report.summary()}')
    spec = _spec(prep, backend, input_shape)
    spec['model'] = Path(path).name
    write_spec(prep.work_dir, spec)
    return result


def check_end2end(work_dir: str | Path) -> str:
    """Run the deployed artifact through the torch-free runtime on the export image and
    compare with the fake-quant model's detections (``reference_end2end.npz``)."""
    from mmdet_regptq.deploy.runtime.detector import Detector

    ref = np.load(Path(work_dir) / REFERENCE_FILE)
    dets, labels = Detector(work_dir).run(ref['input'])
    dets = np.asarray(dets).reshape(-1, 5)
    labels = np.asarray(labels).reshape(-1)
    want, want_labels = ref['dets'].reshape(-1, 5), ref['labels'].reshape(-1)
    text = f'{len(dets)} detections on the export image (fake-quant model: {len(want)})'
    if len(dets) == len(want) and np.array_equal(labels, want_labels):
        diff = float(np.abs(dets - want).max()) if len(want) else 0.0
        return f'{text}, same labels, max |dets diff| = {diff:.3g}'
    return f'{text}, labels or count differ'


def _static_output_shapes(path: str, max_num: int) -> None:
    """Write the static output shapes of a TensorRT graph (``dets [1, max_num, 5]``,
    ``labels [1, max_num]``), which shape inference cannot see through the plugin node."""
    model = onnx.load(path)
    for out in model.graph.output:
        dims = [1, max_num, 5] if out.name == 'dets' else [1, max_num]
        shape = out.type.tensor_type.shape
        del shape.dim[:]
        for d in dims:
            shape.dim.add().dim_value = d
    onnx.save(model, path)


def deploy_end2end(deploy_cfg: Any, model_cfg: Any, checkpoint: str | None, img: Any, *,
                   work_dir: str | Path, device: str = 'cpu',
                   model: torch.nn.Module | None = None) -> DeployResult:
    """``export_end2end`` → ``to_backend`` → the torch-free runtime checked against the
    fake-quant model's detections on the export image."""
    from mmdeploy.utils import get_backend, load_config

    deploy_cfg, model_cfg = load_config(deploy_cfg, model_cfg)
    result = export_end2end(deploy_cfg, model_cfg, checkpoint, img, work_dir, device,
                            model=model)
    if not convert_to_backend(result, deploy_cfg, work_dir, device):
        return result
    backend = get_backend(deploy_cfg).value
    result.notes.append(f'{backend}: {check_end2end(work_dir)}')
    return result
