"""Converter: round trip of the release checkpoint, the restricted unpickler, size checks."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from mmdet_regptq.yolov5.convert import convert_yolov5, read_yolov5, rename_key
from mmdet_regptq.yolov5.unpickle import load_release_checkpoint

from yolov5_utils import ROOT, build_model, coco128_config


class _RunsShell:
    """Unpickling this calls os.system (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_unpickler_refuses_os_system(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pt'
    torch.save({'model': _RunsShell(marker), 'epoch': -1}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(pickle.UnpicklingError, match=r"'posix\.system'|'os\.system'"):
        load_release_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError, match='allow-list'):
        convert_yolov5(path, tmp_path / 'out.pth')
    assert not marker.exists()
    assert not (tmp_path / 'out.pth').exists()


def test_rename_key() -> None:
    assert (rename_key('model.2.m.0.cv1.conv.weight')
            == 'backbone.stage1.1.blocks.0.conv1.conv.weight')
    assert rename_key('model.9.cv2.bn.running_var') == 'backbone.stage4.2.conv2.bn.running_var'
    assert rename_key('model.23.cv3.conv.weight') == 'neck.out_p5.final_conv.conv.weight'
    assert rename_key('model.24.m.2.bias') == 'bbox_head.convs_pred.2.bias'
    with pytest.raises(KeyError, match='model.11'):
        rename_key('model.11.weight')


def test_round_trip(realdata: Path, converted: Path) -> None:
    """Release .pt -> converted file (weights_only) == plain state dict, key by key; the
    converted weights load into the config's model with no missing or unexpected key."""
    ckpt = torch.load(converted, map_location='cpu', weights_only=True)
    meta = ckpt['meta']['yolov5']
    assert (meta['size'], meta['depth_multiple'], meta['width_multiple'],
            meta['num_classes']) == ('n', 0.33, 0.25, 80)
    assert meta['config'] == 'configs/yolov5/yolov5_n_coco.py'
    assert ckpt['meta']['dataset_meta']['classes'][0] == 'person'
    plain = torch.load(realdata / 'yolov5n' / 'yolov5n_state_dict.pth', weights_only=True)
    state = ckpt['state_dict']
    for key, value in plain.items():
        new = rename_key(key)
        if new == 'bbox_head.anchors':
            torch.testing.assert_close(state[new], value.float() * torch.tensor(
                [8., 16., 32.]).view(-1, 1, 1))
        else:
            assert state[new].dtype == (torch.float32 if value.is_floating_point()
                                        else value.dtype)
            assert torch.equal(state[new], value.to(state[new].dtype)), key
    # the plain state dict converts to the same weights
    from_plain, _ = read_yolov5(realdata / 'yolov5n' / 'yolov5n_state_dict.pth')
    assert set(from_plain) == set(plain)

    model = build_model(coco128_config())
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected


def test_wrong_config_names_the_right_one(realdata: Path, converted: Path,
                                          tmp_path: Path) -> None:
    src = realdata / 'yolov5n' / 'yolov5n.pt'
    with pytest.raises(ValueError, match=r'use configs/yolov5/yolov5_n_coco\.py'):
        convert_yolov5(src, tmp_path / 'x.pth', config=ROOT / 'configs/yolov5/yolov5_s_coco.py')
    # loading converted yolov5n weights into the yolov5s model fails the same way
    from mmengine.config import Config
    model = build_model(Config.fromfile(str(ROOT / 'configs/yolov5/yolov5_s_coco.py')))
    state = torch.load(converted, weights_only=True)['state_dict']
    with pytest.raises(ValueError, match=r'checkpoint yolov5n .*use configs/yolov5/yolov5_n'):
        model.load_state_dict(state, strict=False)


def test_cli(realdata: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    dst = tmp_path / 'cli.pth'
    out = subprocess.run([sys.executable, str(ROOT / 'tools' / 'convert_yolov5.py'),
                          str(realdata / 'yolov5n' / 'yolov5n_state_dict.pth'), str(dst),
                          '--config', str(ROOT / 'configs/yolov5/yolov5_n_coco128.py')],
                         capture_output=True, text=True, check=True)
    assert 'yolov5n' in out.stdout and dst.is_file()
