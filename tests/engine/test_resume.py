"""Determinism and resume: the same seed gives the same quantized tensors, and a
calibration killed after some units continues from the last finished one and ends with the
model of an uninterrupted run; no half-written file is left behind."""
from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine_utils import FAST_METHOD, FAST_QUANT, REPO, build_detector, state_equal
from mmdet_regptq.engine.checkpoint import read_quantized
from mmdet_regptq.engine.ptq import quantize_detector
from mmdet_regptq.engine.resume import PARTIAL_NAME, CalibrationResume

STOP_AFTER = 3   # units finished before the interruption


@pytest.fixture(scope='module')
def reference(tiny_cfg, tiny_batches, tmp_path_factory):
    """An uninterrupted calibration with seed 0 (work_dir: partial files on)."""
    work_dir = tmp_path_factory.mktemp('reference')
    model = build_detector(tiny_cfg)
    result = quantize_detector(model, tiny_batches, quant=FAST_QUANT, method=FAST_METHOD,
                               work_dir=work_dir, seed=0)
    return dict(state=model.state_dict(), work_dir=work_dir, num_units=len(result['stats']),
                ckpt=read_quantized(result['checkpoint']))


def _files(work_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(work_dir).iterdir())


def test_same_seed_gives_identical_quantized_tensors(reference, tiny_cfg, tiny_batches):
    model = build_detector(tiny_cfg)
    quantize_detector(model, tiny_batches, quant=FAST_QUANT, method=FAST_METHOD, seed=0)
    assert state_equal(reference['state'], model.state_dict()) == []
    assert reference['num_units'] > STOP_AFTER + 1
    # the partial file is gone once the final checkpoint is written
    assert _files(reference['work_dir']) == ['quantized.pth']


def _stop_after(k: int):
    def on_unit_end(index, unit, stats):
        if index + 1 == k:
            raise KeyboardInterrupt(f'stopped after unit {index + 1} ({unit.name})')
    return on_unit_end


def test_interrupted_calibration_resumes_from_last_unit(reference, tiny_cfg, tiny_batches,
                                                       tmp_path, caplog):
    model = build_detector(tiny_cfg)
    with pytest.raises(KeyboardInterrupt):
        quantize_detector(model, tiny_batches, quant=FAST_QUANT, method=FAST_METHOD,
                          work_dir=tmp_path, seed=0, on_unit_end=_stop_after(STOP_AFTER))
    assert _files(tmp_path) == [PARTIAL_NAME]            # no final file, no .tmp file
    assert torch.load(tmp_path / PARTIAL_NAME)['num_finished'] == STOP_AFTER

    model = build_detector(tiny_cfg)
    with caplog.at_level(logging.INFO, logger='test.resume'):
        result = quantize_detector(model, tiny_batches, quant=FAST_QUANT, method=FAST_METHOD,
                                   work_dir=tmp_path, seed=0,
                                   logger=logging.getLogger('test.resume'))
    assert result['resumed_from_unit'] == STOP_AFTER
    assert len(result['stats']) == reference['num_units'] - STOP_AFTER
    assert any(f'units 1..{STOP_AFTER} of {reference["num_units"]} are done' in r.getMessage()
               for r in caplog.records)
    assert state_equal(reference['state'], model.state_dict()) == []
    ckpt = read_quantized(tmp_path / 'quantized.pth')
    assert state_equal(reference['ckpt']['state_dict'], ckpt['state_dict']) == []
    for key, entry in reference['ckpt']['packed'].items():
        assert torch.equal(entry['codes'], ckpt['packed'][key]['codes'])
    assert _files(tmp_path) == ['quantized.pth']


def test_other_settings_do_not_resume(reference, tmp_path, caplog):
    """A partial file of another seed / bits / data is ignored with a warning."""
    resume = CalibrationResume(tmp_path, {'seed': 0, 'quant': {'w_bits': 4}},
                               logging.getLogger('test.other'))
    model = torch.nn.Conv2d(1, 1, 1)
    resume.save(model, 2, 'unit')
    (tmp_path / f'.{PARTIAL_NAME}.abc123.tmp').write_bytes(b'half')   # left by a SIGKILL
    (tmp_path / '.quantized.pth.x1y2.tmp').write_bytes(b'half')
    other = CalibrationResume(tmp_path, {'seed': 1, 'quant': {'w_bits': 4}},
                              logging.getLogger('test.other'))
    with caplog.at_level(logging.WARNING, logger='test.other'):
        assert other.load() is None
    assert 'made with other seed' in caplog.text
    assert _files(tmp_path) == [PARTIAL_NAME]                          # stale .tmp removed
    assert resume.load()['num_finished'] == 2


def test_nonfinite_state_is_never_saved(tmp_path):
    model = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        model.weight.fill_(float('nan'))
    resume = CalibrationResume(tmp_path, {})
    with pytest.raises(FloatingPointError, match=r"after unit 1 \(u0\): 'weight' has NaN/Inf"):
        resume.save(model, 1, 'u0')
    assert _files(tmp_path) == []


_CHILD = '''
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from engine_utils import FAST_METHOD, FAST_QUANT, build_detector, calib_batches, small_cfg
from mmdet_regptq.engine.ptq import quantize_detector

def on_unit_end(index, unit, stats):
    print('UNIT', index + 1, flush=True)
    if index + 1 == {stop}:
        time.sleep(600)        # the parent sends SIGTERM now

cfg = small_cfg()
quantize_detector(build_detector(cfg), calib_batches(cfg), quant=FAST_QUANT,
                  method=FAST_METHOD, work_dir={work_dir!r}, seed=0, on_unit_end=on_unit_end)
print('DONE', flush=True)
'''


def test_sigterm_mid_calibration_then_rerun(reference, tiny_cfg, tiny_batches, tmp_path):
    script = tmp_path / 'child.py'
    work_dir = tmp_path / 'work'
    script.write_text(textwrap.dedent(_CHILD.format(
        tests=str(Path(__file__).parent), stop=STOP_AFTER, work_dir=str(work_dir))))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    stderr = open(tmp_path / 'stderr.txt', 'w')
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, cwd=REPO, env=env)
    try:
        for line in proc.stdout:
            if line.strip() == f'UNIT {STOP_AFTER}':
                proc.send_signal(signal.SIGTERM)
                break
        returncode = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr.close()
    assert returncode == 128 + signal.SIGTERM            # CalibrationInterrupted exit code
    assert (f'a resumable state is saved: {work_dir / PARTIAL_NAME} holds units '
            f'1..{STOP_AFTER}' in (tmp_path / 'stderr.txt').read_text())
    assert _files(work_dir) == [PARTIAL_NAME]
    assert torch.load(work_dir / PARTIAL_NAME)['num_finished'] == STOP_AFTER

    model = build_detector(tiny_cfg)
    result = quantize_detector(model, tiny_batches, quant=FAST_QUANT, method=FAST_METHOD,
                               work_dir=work_dir, seed=0)
    assert result['resumed_from_unit'] == STOP_AFTER
    assert state_equal(reference['state'], model.state_dict()) == []
    assert _files(work_dir) == ['quantized.pth']


class _WithUnusedConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.unused = torch.nn.Conv2d(4, 4, 1)      # built by the config, never called

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_resume_with_a_layer_the_forward_never_calls():
    """calibrate(start_unit>0) checked every wrapper's activation scale, also of wrappers the
    forward never calls (never initialised): resuming such a model always raised."""
    from mmdet_regptq.calib.methods import QDrop
    from mmdet_regptq.quant import quantize_model

    def forward_fn(model, batch):
        return model(batch)

    batches = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    policy = dict(w_bits=4, a_bits=4, first_layer=None, fold_bn=False)
    method = QDrop(iters=2, progress=False, log_interval=0, block_scopes=())
    states = {}
    torch.manual_seed(0)
    model = _WithUnusedConv()
    init = copy.deepcopy(model.state_dict())
    quantize_model(model, policy)
    method.calibrate(model, batches, forward_fn,
                     on_unit_end=lambda k, u, s: states.setdefault(k, copy.deepcopy(
                         model.state_dict())))
    resumed = _WithUnusedConv()
    resumed.load_state_dict(init)
    quantize_model(resumed, policy)
    method.restore_finished(resumed, method.find_units(resumed, forward_fn, batches[0]), 1)
    resumed.load_state_dict(states[0])
    method.calibrate(resumed, batches, forward_fn, start_unit=1)
    assert state_equal(model.state_dict(), resumed.state_dict()) == []
