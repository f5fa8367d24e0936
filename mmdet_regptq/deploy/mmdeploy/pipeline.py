"""The deployment pipeline behind ``tools/deploy.py``, on mmdeploy's own APIs.

mmdeploy's ``tools/deploy.py`` runs ``torch2onnx`` → ``to_backend`` → a backend-model check.
``torch2onnx`` builds the *float* model from the checkpoint (``build_pytorch_model``) and
has no step where a quantized model could be substituted, so :func:`export_detector`
repeats its few lines with our step in between:

    build_task_processor → build_pytorch_model → [quantize + load quantized.pth] →
    create_input → mmdeploy.apis.onnx.export (under export_mode) → lower Q/DQ

(two graphs for a two-stage detector: ``detectors/two_stage.py``)

and everything after the ONNX file is mmdeploy's: ``mmdeploy.apis.utils.to_backend`` (our
``tvm_int4`` / ``tvm_relax`` managers, or onnxruntime), ``build_backend_model`` (our
``regptq_raw`` detector model) and ``build_test_runner`` for AP with mmdet's metric.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from mmdet_regptq.deploy.detectors.build import quantize_for_deploy
from mmdet_regptq.deploy.detectors.raw import RawDetector, raw_output_names
from mmdet_regptq.deploy.detectors.two_stage import (ROI_INPUT, RoIStage, RpnStage,
                                                     TwoStageHost, check_deployable,
                                                     is_two_stage, num_rois_of, roi_graph_file)
from mmdet_regptq.deploy.mmdeploy.options import regptq_options
from mmdet_regptq.deploy.mmdeploy.tensorrt import check_tensorrt_qdq
from mmdet_regptq.deploy.onnx.export import (TORCHSCRIPT_MAX_OPSET, export_mode, finalize_onnx,
                                             legacy_onnx_export)
from mmdet_regptq.deploy.onnx.lower import ExportReport
from mmdet_regptq.deploy.onnx.ort_int8 import make_ort_int8

__all__ = ['DeployResult', 'load_deploy_model', 'export_detector', 'deploy', 'evaluate',
           'is_quantized_checkpoint']

logger = logging.getLogger(__name__)


@dataclass
class DeployResult:
    """Files and checks of one deployment."""

    onnx_file: str
    onnx_files: list[str] = field(default_factory=list)  # two-stage: + the RoI graph
    backend_files: list[str] = field(default_factory=list)
    export: ExportReport | None = None
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None


def is_quantized_checkpoint(path: str | Path | None) -> dict | None:
    """``meta`` of a quantized checkpoint (``quantize_detector``'s ``quantized.pth``), else
    None (a float checkpoint, or no checkpoint)."""
    if path is None:
        return None
    ckpt = torch.load(str(path), map_location='cpu', weights_only=True)
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    return meta if isinstance(meta, dict) and 'quant' in meta and 'method' in meta else None


def load_deploy_model(task_processor: Any, checkpoint: str | None) -> torch.nn.Module:
    """The PyTorch model to export: float from a float checkpoint, or quantized (policy and
    method from the checkpoint's meta) from a quantized one."""
    meta = is_quantized_checkpoint(checkpoint)
    if meta is None:
        return task_processor.build_pytorch_model(checkpoint)
    model = task_processor.build_pytorch_model(None)
    method = meta.get('method_cfg') or (
        meta['method'] if isinstance(meta['method'], dict) else dict(type=meta['method']))
    quantize_for_deploy(model, quant=meta['quant'], method=method,
                        quantized_checkpoint=str(checkpoint))
    model._regptq_quantized = True
    return model.eval()


def _pad_to(inputs: torch.Tensor, shape: Sequence[int] | None) -> torch.Tensor:
    if not shape:
        return inputs
    w, h = shape
    return F.pad(inputs, (0, w - inputs.shape[-1], 0, h - inputs.shape[-2]))


def _calib_feeds(task_processor: Any, model: torch.nn.Module, shape: Sequence[int] | None,
                 extra: Sequence[tuple[torch.Tensor, list]], num: int
                 ) -> list[tuple[torch.Tensor, list]]:
    """Preprocessed images (and their metainfo) for the ORT INT8 output ranges: the model
    config's test set when it is readable (``num`` images), else the given images."""
    feeds = list(extra)
    try:
        cfg = task_processor.model_cfg
        loader_cfg = dict(cfg.test_dataloader)
        loader_cfg.update(batch_size=1, num_workers=0, persistent_workers=False)
        loader = task_processor.build_dataloader(loader_cfg)
        for i, data in enumerate(loader):
            if i >= num:
                break
            batch = model.data_preprocessor(data, False)
            feeds.append((_pad_to(batch['inputs'], shape).cpu(),
                          [s.metainfo for s in batch['data_samples']]))
    except Exception as err:  # noqa: BLE001 - no dataset here (e.g. COCO configs)
        logger.warning('calibration images from the test set unavailable (%s); using the '
                       'deployment image(s) only', err)
    return feeds


def _export_task_processor(model_cfg: Any, deploy_cfg: Any, device: str) -> Any:
    """mmdeploy's task processor for the export. mmdeploy refuses ``device='cpu'`` for a
    TensorRT config because building the engine needs a GPU; the ONNX export does not, and
    no machine here has TensorRT. So for the export step only, that device check is left
    out (the rest is ``mmdeploy.apis.build_task_processor``)."""
    from mmdeploy.apis import build_task_processor
    from mmdeploy.codebase import get_codebase_class, import_codebase
    from mmdeploy.utils import get_backend, get_codebase
    from mmdeploy.utils.config_utils import get_codebase_external_module

    if get_backend(deploy_cfg).value != 'tensorrt' or device != 'cpu':
        return build_task_processor(model_cfg, deploy_cfg, device)
    codebase_type = get_codebase(deploy_cfg, model_cfg=model_cfg)
    import_codebase(codebase_type, get_codebase_external_module(deploy_cfg))
    return get_codebase_class(codebase_type).build_task_processor(model_cfg, deploy_cfg,
                                                                   device)


@dataclass
class PreparedExport:
    """What every export starts from: configs, options, the (quantized) model and the
    preprocessed export image padded to the static shape."""

    deploy_cfg: Any
    model_cfg: Any
    opts: dict
    task_processor: Any
    model: torch.nn.Module
    inputs: torch.Tensor
    metas: list
    shape: Sequence[int] | None   # [W, H] (mmdeploy's order) or None
    work_dir: Path


def prepare_export(deploy_cfg: Any, model_cfg: Any, checkpoint: str | None, img: Any,
                   work_dir: str | Path, device: str = 'cpu',
                   model: torch.nn.Module | None = None) -> PreparedExport:
    """Load the configs and the model (quantized from a ``quantized.pth``), and build the
    export input with mmdeploy's ``create_input``."""
    from mmdeploy.utils import get_input_shape, load_config

    deploy_cfg, model_cfg = load_config(deploy_cfg, model_cfg)
    opts = regptq_options(deploy_cfg)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    task_processor = _export_task_processor(model_cfg, deploy_cfg, device)
    if model is None:
        model = load_deploy_model(task_processor, checkpoint)
    if opts['require_quantized'] and not getattr(model, '_regptq_quantized', False):
        raise ValueError('this deploy config needs a quantized checkpoint (quantized.pth '
                         'written by RegPTQHook / quantize_detector), got a float one')
    shape = get_input_shape(deploy_cfg)
    data, inputs = task_processor.create_input(img, shape,
                                               data_preprocessor=model.data_preprocessor)
    inputs = _pad_to(inputs if isinstance(inputs, torch.Tensor) else inputs[0], shape).cpu()
    metas = [s.metainfo for s in data['data_samples']]
    return PreparedExport(deploy_cfg, model_cfg, opts, task_processor, model, inputs, metas,
                          shape, work_dir)


def apply_onnx_format(prep: PreparedExport, graphs: Sequence[tuple[str, str, Any]],
                      result: DeployResult) -> None:
    """``regptq.onnx_format`` on every exported graph ``(path, input name, make_input)``:
    ``'ort_int8'`` rewrites it for ONNX Runtime's integer kernels (output ranges measured on
    test-set images), ``'tensorrt'`` checks TensorRT's explicit-quantization rules."""
    opts = prep.opts
    if opts['onnx_format'] == 'ort_int8':
        images = _calib_feeds(prep.task_processor, prep.model, prep.shape,
                              [(prep.inputs, prep.metas)], opts['calib_images'])
        for path, name, make_input in graphs:
            feeds = [{name: make_input(x, m).numpy()} for x, m in images]
            fused, int8_report = make_ort_int8(onnx.load(path), feeds,
                                               target_cpu=opts['target_cpu'])
            onnx.save(fused, path)
            result.notes.append(f'ORT INT8 {Path(path).name}: {int8_report.summary()}')
            if int8_report.widened:
                result.notes.append(f'hint: {int8_report.hint()}')
    elif opts['onnx_format'] == 'tensorrt':
        for path, _, _ in graphs:
            check = check_tensorrt_qdq(onnx.load(path))
            result.notes.append(f'{Path(path).name}: {check.summary()}')
            if not check.ok:
                raise ValueError(f'{Path(path).name} breaks TensorRT explicit-quantization '
                                 'rules:\n  ' + '\n  '.join(check.errors[:20]))


def export_detector(deploy_cfg: Any, model_cfg: Any, checkpoint: str | None, img: Any,
                    work_dir: str | Path, device: str = 'cpu',
                    model: torch.nn.Module | None = None) -> DeployResult:
    """Export the (quantized) detector's raw outputs to ``work_dir/<save_file>``.

    Args:
        deploy_cfg: deploy config (path or Config).
        model_cfg: mmdet model config (path or Config).
        checkpoint: float checkpoint, ``quantized.pth``, or None (random init).
        img: image path / array used for the export (mmdeploy's ``img`` argument).
        work_dir: output directory.
        device: only ``'cpu'`` is exported (mmdeploy exports on CPU anyway).
        model: an already built (and quantized) model to export instead of loading one.

    Returns:
        :class:`DeployResult` with the ONNX file (lowered and checked).
    """
    from mmdeploy.apis.onnx import export
    from mmdeploy.utils import get_backend, get_onnx_config

    prep = prepare_export(deploy_cfg, model_cfg, checkpoint, img, work_dir, device, model)
    deploy_cfg, model_cfg, model = prep.deploy_cfg, prep.model_cfg, prep.model
    opts, work_dir, inputs, metas = prep.opts, prep.work_dir, prep.inputs, prep.metas
    onnx_cfg = get_onnx_config(deploy_cfg)
    two_stage = is_two_stage(model)
    if two_stage:
        check_deployable(model)       # before any file is written
        stage1: torch.nn.Module = RpnStage(model).eval()
        names = stage1.output_names(inputs)
    else:
        stage1 = RawDetector(model).eval()
        names = raw_output_names(model, inputs)
    prefix = str(work_dir / Path(onnx_cfg.get('save_file', 'end2end.onnx')).stem)
    opset = onnx_cfg.get('opset_version', 21)
    context = dict(deploy_cfg=deploy_cfg)
    input_name = list(onnx_cfg.get('input_names', ['input']))[0]

    def export_graph(module: torch.nn.Module, x: torch.Tensor, path_prefix: str,
                     input_names: list[str], output_names: list[str]) -> ExportReport:
        with export_mode(module) as report, legacy_onnx_export():
            export(module, x, output_path_prefix=path_prefix,
                   backend=get_backend(deploy_cfg).value, input_metas=None,
                   context_info=context, input_names=input_names, output_names=output_names,
                   opset_version=min(opset, TORCHSCRIPT_MAX_OPSET), dynamic_axes=None,
                   keep_initializers_as_inputs=onnx_cfg.get('keep_initializers_as_inputs',
                                                            False),
                   optimize=False)
        finalize_onnx(path_prefix + '.onnx', int4_weights=opts['int4_weights'], report=report,
                      target_opset=opset)
        return report

    report = export_graph(stage1, inputs, prefix, [input_name], names)
    onnx_file = prefix + '.onnx'
    result = DeployResult(onnx_file=onnx_file, onnx_files=[onnx_file], export=report)
    with torch.no_grad():
        reference = [t.numpy() for t in stage1(inputs)]
    # graph 2 of a two-stage detector: the RoI box head on the export image's proposals
    graphs = [(onnx_file, input_name, lambda x, m: x)]
    if two_stage:
        host = TwoStageHost(model, num_rois_of(model_cfg, opts['num_rois']))
        roi_stage = RoIStage(model).eval()
        roi_feats = host.sample_roi_features(stage1, inputs, metas)
        roi_file = roi_graph_file(onnx_file)
        roi_report = export_graph(roi_stage, roi_feats, roi_file[:-len('.onnx')], [ROI_INPUT],
                                  list(RoIStage.output_names))
        result.onnx_files.append(roi_file)
        result.notes.append(f'RoI graph export: {roi_report.summary()}')
        with torch.no_grad():
            roi_reference = [t.numpy() for t in roi_stage(roi_feats)]
        np.savez(work_dir / 'reference_outputs_roi.npz', **{ROI_INPUT: roi_feats.numpy()},
                 **dict(zip(RoIStage.output_names, roi_reference)))
        graphs.append((result.onnx_files[1], ROI_INPUT,
                       lambda x, m: host.sample_roi_features(stage1, x, m)))
    apply_onnx_format(prep, graphs, result)
    result.notes.append(f'export: {report.summary()}')
    np.savez(work_dir / 'reference_outputs.npz', input=inputs.numpy(),
             **dict(zip(names, reference)))
    return result



def convert_to_backend(result: DeployResult, deploy_cfg: Any, work_dir: str | Path,
                       device: str) -> bool:
    """Fill ``result.backend_files`` from its ONNX files with mmdeploy's ``to_backend``
    (ONNX Runtime runs the ONNX files as they are). False, with a note, when the config's
    backend is not installed here."""
    from mmdeploy.apis.utils import to_backend
    from mmdeploy.backend.base import get_backend_manager
    from mmdeploy.utils import get_backend

    backend = get_backend(deploy_cfg).value
    manager = get_backend_manager(backend)
    if backend == 'onnxruntime':
        result.backend_files = list(result.onnx_files)
    elif manager is None or not manager.is_available():
        result.notes.append(f'backend {backend!r} is not installed here: stopping at the '
                            f'ONNX model(s) {", ".join(result.onnx_files)}')
        return False
    else:
        result.backend_files = list(to_backend(backend, list(result.onnx_files),
                                               str(work_dir), deploy_cfg=deploy_cfg,
                                               device=device))
    return True

def deploy(deploy_cfg: Any, model_cfg: Any, checkpoint: str | None, img: Any, *,
           work_dir: str | Path, device: str = 'cpu', test_img: Any = None,
           model: torch.nn.Module | None = None) -> DeployResult:
    """``export_detector`` → ``to_backend`` → run the backend model on ``test_img``; an
    end-to-end deploy config (``model_type='end2end'``) goes to ``deploy_end2end``.

    TensorRT is not installable here: for a ``tensorrt`` deploy config the validated ONNX
    file is the result and ``notes`` says so.
    """
    from mmdeploy.apis import build_task_processor
    from mmdeploy.utils import get_backend, load_config

    from mmdet_regptq.deploy.mmdeploy.end2end import deploy_end2end, is_end2end

    deploy_cfg, model_cfg = load_config(deploy_cfg, model_cfg)
    if is_end2end(deploy_cfg):
        return deploy_end2end(deploy_cfg, model_cfg, checkpoint, img, work_dir=work_dir,
                              device=device, model=model)
    result = export_detector(deploy_cfg, model_cfg, checkpoint, img, work_dir, device,
                             model=model)
    if not convert_to_backend(result, deploy_cfg, work_dir, device):
        return result
    backend = get_backend(deploy_cfg).value
    task_processor = build_task_processor(model_cfg, deploy_cfg, device)
    backend_model = task_processor.build_backend_model(result.backend_files)
    stored = np.load(Path(work_dir) / 'reference_outputs.npz')
    raw = backend_model.raw_forward(torch.from_numpy(stored['input']))
    flat = [t for level in raw for t in level]
    names = sorted((k for k in stored.files if k != 'input'),
                   key=lambda k: tuple(int(p) for p in k[3:].split('_')))
    result.max_abs_diff = max(float(np.abs(stored[n] - t.numpy()).max())
                              for n, t in zip(names, flat))
    roi_file = Path(work_dir) / 'reference_outputs_roi.npz'
    if len(result.onnx_files) > 1 and roi_file.exists():
        roi = np.load(roi_file)
        outs = backend_model.roi_forward(torch.from_numpy(roi[ROI_INPUT]))
        roi_diff = max(float(np.abs(roi[n] - t.numpy()).max())
                       for n, t in zip(RoIStage.output_names, outs))
        result.notes.append(f'{backend}: RoI graph outputs vs PyTorch model, max |diff| = '
                            f'{roi_diff:.3g}')
        result.max_abs_diff = max(result.max_abs_diff, roi_diff)
    result.notes.append(f'{backend}: raw outputs vs PyTorch model, max |diff| = '
                        f'{result.max_abs_diff:.3g}')
    if test_img is not None:
        data, inputs = task_processor.create_input(test_img, None,
                                                   data_preprocessor=None)
        data = backend_model.data_preprocessor(data, False)
        with torch.no_grad():
            samples = backend_model(data['inputs'], data['data_samples'], mode='predict')
        dets = samples[0].pred_instances
        keep = dets.scores > 0.3
        result.notes.append(f'{backend}: {int(keep.sum())} detections with score > 0.3 on '
                            f'{test_img}')
    return result


def evaluate(deploy_cfg: Any, model_cfg: Any, backend_files: Sequence[str], *,
             work_dir: str | Path, device: str = 'cpu') -> dict:
    """AP of the deployed model on the model config's test set (mmdet's CocoMetric through
    mmdeploy's ``build_test_runner``)."""
    from mmdeploy.apis import build_task_processor
    from mmdeploy.utils import get_input_shape, load_config

    from mmdet_regptq.deploy.detectors.spec import static_letterbox

    deploy_cfg, model_cfg = load_config(deploy_cfg, model_cfg)
    shape = get_input_shape(deploy_cfg)     # [W, H]
    if shape:   # a letterbox pads to the static shape, as the export did
        model_cfg = static_letterbox(model_cfg, (shape[1], shape[0]))
    model_cfg.test_dataloader.batch_size = 1   # the deployed graphs are static, batch 1
    task_processor = build_task_processor(model_cfg, deploy_cfg, device)
    backend_model = task_processor.build_backend_model(list(backend_files))
    runner = task_processor.build_test_runner(backend_model, str(work_dir))
    return runner.test()
