"""No checkpoint load the package performs or patches runs code from the file.

Malicious pickles (zip and legacy torch formats, and a plain ``pickle.dump``) whose payload
creates a file go through every entry point; each test asserts that the payload did not
run and that the error names the file's disallowed global. mmengine training checkpoints
(HistoryBuffer message hub, numpy) still load (see also ``tests/test_compat.py``).
"""
from __future__ import annotations

import builtins
import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mmdet_regptq  # noqa: F401  (patches mmengine's local loader, as custom_imports does)
from mmdet_regptq.safe_load import (CorruptCheckpointError, UnsafeCheckpointError,
                                    load_checkpoint_file)

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ('zip', 'legacy', 'pickle')


class _Payload:
    """Unpickling calls ``func(*args)``: each payload creates the marker file."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    """``global name -> payload``, each creating ``marker`` when it runs."""
    system = f'touch {marker}'
    return {
        f'{os.system.__module__}.system': _Payload(os.system, (system,)),
        'builtins.exec': _Payload(builtins.exec, (f'open({str(marker)!r}, "w").close()',)),
        'subprocess.call': _Payload(subprocess.call, (['touch', str(marker)],)),
    }


def write_evil(path: Path, fmt: str, marker: Path, which: str | None = None) -> str:
    """A checkpoint-looking file with a payload; returns the payload's global name."""
    payloads = _payloads(marker)
    name = which or next(iter(payloads))
    obj = {'evil': payloads[name], 'meta': {'epoch': 1}, 'state_dict': {'w': torch.ones(2)}}
    if fmt == 'zip':
        torch.save(obj, path)
    elif fmt == 'legacy':
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:   # a pickled tensor would stop at torch.storage._load_from_bytes (refused too)
        obj['state_dict'] = {'w': [1.0, 1.0]}
        with open(path, 'wb') as f:
            pickle.dump(obj, f)
    return name


def assert_refused(err: BaseException | str, global_name: str, marker: Path) -> None:
    text = str(err)
    assert not marker.exists(), 'the payload ran'
    assert global_name in text, text
    assert 'weights_only=False' not in text, text


@pytest.fixture
def marker(tmp_path):
    return tmp_path / 'PAYLOAD_RAN'


# --------------------------------------------------------------------------- the loader
@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('which', ['posix.system', 'builtins.exec', 'subprocess.call'])
def test_load_checkpoint_file_refuses_every_payload(tmp_path, marker, fmt, which):
    which = which.replace('posix', os.system.__module__)
    path = tmp_path / f'evil_{fmt}.pth'
    write_evil(path, fmt, marker, which)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(path)
    assert_refused(info.value, which, marker)
    assert str(path) in str(info.value)
    assert info.value.global_name == which


@pytest.mark.parametrize('fmt', FORMATS)
def test_mmengine_checkpoint_loader_after_import(tmp_path, marker, fmt):
    """What ``mim run mmdet test cfg evil.pth``, ``load_from`` and ``resume`` call."""
    from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

    path = tmp_path / f'evil_{fmt}.pth'
    name = write_evil(path, fmt, marker)
    for load in (CheckpointLoader.load_checkpoint, _load_checkpoint):
        with pytest.raises(UnsafeCheckpointError) as info:
            load(str(path), map_location='cpu')
        assert_refused(info.value, name, marker)


def test_the_reported_command_line_does_not_run_the_payload(tmp_path, marker):
    """The reproduction of the report, in a fresh interpreter."""
    path = tmp_path / 'evil_legacy.pth'
    name = write_evil(path, 'pickle', marker)
    code = ('import sys, mmdet_regptq; from mmengine.runner.checkpoint import CheckpointLoader; '
            'CheckpointLoader.load_checkpoint(sys.argv[1])')
    proc = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert_refused(proc.stderr, name, marker)
    assert 'UnsafeCheckpointError' in proc.stderr


@pytest.mark.parametrize('fmt', ('zip', 'legacy'))
def test_runner_load_from_and_resume(tmp_path, marker, fmt):
    """``load_from`` / ``resume`` of an mmengine Runner (training and testing)."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Tiny(BaseModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(1, 1)

        def forward(self, inputs=None, data_samples=None, mode='tensor'):
            return self.w(inputs)

    path = tmp_path / f'evil_{fmt}.pth'
    name = write_evil(path, fmt, marker)
    for resume in (False, True):
        runner = Runner(model=Tiny(), work_dir=str(tmp_path / f'work{resume}'),
                        load_from=str(path), resume=resume)
        with pytest.raises(UnsafeCheckpointError) as info:
            if resume:
                runner.resume(str(path))
            else:
                runner.load_or_resume()
        assert_refused(info.value, name, marker)


def test_training_checkpoints_still_load_in_every_format(tmp_path):
    """The allow-list admits what mmengine's CheckpointHook writes (zip and legacy)."""
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    buf = HistoryBuffer()
    buf.update(np.float64(0.5))
    obj = {'state_dict': {'w': torch.ones(2)}, 'meta': {'epoch': 3, 'seed': np.int64(7)},
           'message_hub': {'log_scalars': {'train/loss': buf},
                           'runtime_info': {'arr': np.arange(3)}}}
    for fmt, kwargs in (('zip', {}), ('legacy', {'_use_new_zipfile_serialization': False})):
        path = tmp_path / f'epoch_3_{fmt}.pth'
        torch.save(obj, path, **kwargs)
        ckpt = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
        assert ckpt['meta']['seed'] == 7
        assert ckpt['message_hub']['log_scalars']['train/loss'].mean() == 0.5
        assert torch.load(path, weights_only=True)['meta']['epoch'] == 3  # e.g. MMDeploy's


def test_corrupt_files_get_one_clean_error(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': {'w': torch.ones(64)}}, good)
    data = good.read_bytes()
    for name, content in (('truncated.pth', data[:len(data) // 2]), ('text.pth', b'hello'),
                          ('plain.pkl', pickle.dumps({'a': 1}))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CorruptCheckpointError, match=rf"{name}' cannot be read as a "
                                                         'torch checkpoint'):
            load_checkpoint_file(tmp_path / name)


# --------------------------------------------------------------------------- the tools
def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f'{name}_cli', ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bundled() -> tuple[str, str]:
    stem = 'retinanet_r18-16_fpn64_synthetic'
    ckpt = ROOT / 'checkpoints' / f'{stem}.pth'
    assert ckpt.is_file(), f'bundled checkpoint {ckpt} is missing'
    return str(ROOT / 'configs' / 'synthetic' / f'{stem}.py'), str(ckpt)


@pytest.mark.parametrize('fmt', FORMATS)
def test_tools_deploy(tmp_path, marker, capsys, fmt):
    config, _ = _bundled()
    path = tmp_path / f'evil_{fmt}.pth'
    name = write_evil(path, fmt, marker)
    deploy_cfg = ROOT / 'deploy_configs' / 'detection_onnxruntime_static-192x192.py'
    img = ROOT / 'data' / 'synthetic' / 'val' / '000000.jpg'
    code = _tool('deploy').main([str(deploy_cfg), config, str(path), str(img),
                                 '--work-dir', str(tmp_path / 'work')])
    assert code == 2
    assert_refused(capsys.readouterr().err, name, marker)


@pytest.mark.parametrize('fmt', FORMATS)
def test_tools_analyze(tmp_path, marker, capsys, fmt):
    config, ckpt = _bundled()
    path = tmp_path / f'evil_{fmt}.pth'
    name = write_evil(path, fmt, marker)
    analyze = _tool('analyze')
    assert analyze.main(['weights', config, str(path), '--out-dir', str(tmp_path)]) == 2
    assert_refused(capsys.readouterr().err, name, marker)
    assert analyze.main(['compare', config, ckpt, str(path), '--out-dir', str(tmp_path)]) == 2
    assert_refused(capsys.readouterr().err, name, marker)


def test_nested_unrestricted_load_is_refused(tmp_path, marker):
    """A tensor pickled with plain ``pickle`` is rebuilt by ``torch.storage._load_from_bytes``,
    which calls ``torch.load(weights_only=False)`` on bytes from the file: refused."""
    path = tmp_path / 'plain_tensor.pkl'
    with open(path, 'wb') as f:
        pickle.dump({'w': torch.ones(2)}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"global 'torch\.storage\._load_from_bytes'"):
        load_checkpoint_file(path)


def test_tools_deploy_accepts_a_training_checkpoint(tmp_path, capsys):
    """What ``mim run mmdet test`` accepts: an mmengine ``epoch_N.pth`` with its message hub;
    a corrupt file gets one line and status 2 (no traceback)."""
    from mmengine.logging.history_buffer import HistoryBuffer

    config, ckpt = _bundled()
    buf = HistoryBuffer()
    buf.update(np.float64(0.25))
    epoch = tmp_path / 'epoch_12.pth'
    torch.save({'state_dict': torch.load(ckpt)['state_dict'],
                'meta': {'epoch': 12, 'seed': np.int64(0)},
                'message_hub': {'log_scalars': {'train/loss': buf}, 'runtime_info': {}}}, epoch)
    deploy_cfg = ROOT / 'deploy_configs' / 'detection_onnxruntime_static-192x192.py'
    img = ROOT / 'data' / 'synthetic' / 'val' / '000000.jpg'
    deploy = _tool('deploy')
    work = tmp_path / 'work'
    assert deploy.main([str(deploy_cfg), config, str(epoch), str(img), '--work-dir',
                        str(work)]) == 0
    assert list(work.glob('*.onnx'))
    corrupt = tmp_path / 'epoch_13.pth'
    corrupt.write_bytes(epoch.read_bytes()[:1000])
    capsys.readouterr()
    assert deploy.main([str(deploy_cfg), config, str(corrupt), str(img), '--work-dir',
                        str(work)]) == 2
    err = capsys.readouterr().err
    assert 'epoch_13.pth' in err and 'cannot be read as a torch checkpoint' in err
    assert 'Traceback' not in err and 'weights_only' not in err
