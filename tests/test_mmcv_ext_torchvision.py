"""The torchvision stand-in for mmcv's compiled ops (used by ``benchmarks/gpu.py``) gives
the same NMS and RoIAlign (forward and backward) as mmcv's own compiled ops."""
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHIM_PATH = ROOT / 'benchmarks' / 'mmcv_ext_torchvision.py'


def _load_shim():
    spec = importlib.util.spec_from_file_location('mmcv_ext_torchvision', SHIM_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_boxes(num: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(num, 2, generator=gen) * 80
    wh = torch.rand(num, 2, generator=gen) * 40 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize('offset', [0, 1])
def test_nms_keeps_what_mmcv_keeps(offset):
    mmcv_nms = importlib.import_module('mmcv.ops.nms')  # the module, not mmcv.ops.nms()

    shim = _load_shim()
    gen = torch.Generator().manual_seed(0)
    boxes, scores = _random_boxes(300, gen), torch.rand(300, generator=gen)
    expected = mmcv_nms.ext_module.nms(boxes, scores, iou_threshold=0.5, offset=offset)
    got = shim.nms(boxes, scores, iou_threshold=0.5, offset=offset)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match='offset=2'):
        shim.nms(boxes, scores, iou_threshold=0.5, offset=2)


@pytest.mark.parametrize('aligned,sampling', [(True, 0), (False, 2)])
def test_roi_align_forward_and_backward_match_mmcv(monkeypatch, aligned, sampling):
    mmcv_roi_align = importlib.import_module('mmcv.ops.roi_align')

    shim = _load_shim()
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 8, 24, 24, generator=gen)
    boxes = _random_boxes(12, gen) / 4
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=gen).float(), boxes], dim=1)

    def run():
        x = feats.clone().requires_grad_()
        out = mmcv_roi_align.roi_align(x, rois, (7, 7), 0.5, sampling, 'avg', aligned)
        (out * torch.arange(out.numel()).reshape(out.shape).float().sin()).sum().backward()
        return out.detach(), x.grad

    ref_out, ref_grad = run()
    monkeypatch.setattr(mmcv_roi_align, 'ext_module', shim)
    out, grad = run()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="only 'avg'"):
        mmcv_roi_align.roi_align(feats, rois, (7, 7), 0.5, sampling, 'max', aligned)


def test_mmdet_imports_and_unknown_ops_fail_when_called():
    """In place of ``mmcv._ext``, ``ext_loader`` accepts it and mmdet's models import."""
    code = (
        'import importlib.util, sys\n'
        f'spec = importlib.util.spec_from_file_location("mmcv._ext", {str(SHIM_PATH)!r})\n'
        'mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n'
        'sys.modules["mmcv._ext"] = mod\n'
        'import mmdet.models, mmcv.ops\n'
        'assert mmcv.ops.nms.__module__ == "mmcv.ops.nms"\n'
        'try:\n'
        '    mod.deform_conv_forward()\n'
        'except NotImplementedError as err:\n'
        '    print("raised:", err)\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised: mmcv op 'deform_conv_forward'" in proc.stdout
