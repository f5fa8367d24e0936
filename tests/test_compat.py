"""The stack fixes in mmdet_regptq.compat: each test fails without its fix."""
import subprocess
import sys

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer


def _training_like_checkpoint(path):
    """What mmengine's CheckpointHook writes besides tensors: a message hub with
    HistoryBuffers of numpy values, numpy scalars in meta."""
    buf = HistoryBuffer()
    buf.update(np.float64(0.5))
    torch.save({'state_dict': {'w': torch.ones(2)},
                'meta': {'epoch': 3, 'seed': np.int64(0)},
                'message_hub': {'log_scalars': {'train/loss': buf},
                                'runtime_info': {'arr': np.arange(3)}}}, path)


LOAD = ('import sys; from mmengine.runner.checkpoint import _load_checkpoint; '
        '{imp}; ckpt = _load_checkpoint(sys.argv[1], map_location="cpu"); print(ckpt["meta"]["epoch"])')


def test_training_checkpoint_fails_to_load_without_the_fix(tmp_path):
    path = tmp_path / 'epoch_3.pth'
    _training_like_checkpoint(path)
    proc = subprocess.run([sys.executable, '-c', LOAD.format(imp='pass'), str(path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and 'Weights only load failed' in proc.stderr


def test_training_checkpoint_loads_with_the_fix(tmp_path):
    path = tmp_path / 'epoch_3.pth'
    _training_like_checkpoint(path)
    proc = subprocess.run([sys.executable, '-c', LOAD.format(imp='import mmdet_regptq'), str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith('3')


def test_apply_is_idempotent_and_keeps_the_loader_restricted(tmp_path):
    import pytest
    from mmengine.runner.checkpoint import _load_checkpoint

    from mmdet_regptq import compat
    from mmdet_regptq.safe_load import UnsafeCheckpointError, history_buffer_getattr
    compat.apply()
    compat.apply()
    path = tmp_path / 'evil.pth'
    torch.save({'x': subprocess.Popen}, path)  # an arbitrary class stays refused
    with pytest.raises(UnsafeCheckpointError, match="global 'subprocess.Popen'"):
        _load_checkpoint(str(path), map_location='cpu')
    with pytest.raises(Exception, match='only the statistics'):
        history_buffer_getattr('text', 'upper')
    # the getattr allow-listed for torch's own weights_only reader is the restricted one
    torch.save({'x': HistoryBuffer.update}, path)   # pickled as getattr(HistoryBuffer, ...)
    with pytest.raises(Exception, match='only the statistics'):
        torch.load(path, weights_only=True)


DIST = '''
import os, torch
{imp}
from mmengine.dist import init_dist, get_world_size, get_rank, all_reduce
from mmengine.model.wrappers import MMDistributedDataParallel
init_dist('pytorch', backend='gloo')
model = MMDistributedDataParallel(torch.nn.Linear(2, 2),
                                  device_ids=[int(os.environ['LOCAL_RANK'])])
x = torch.tensor([float(get_rank() + 1)])
all_reduce(x)
with open(os.path.join({out!r}, f'rank{{get_rank()}}.txt'), 'w') as f:  # no interleaving
    f.write(f'world {{get_world_size()}} sum {{int(x)}}')
'''


def _torchrun(tmp_path, imp):
    script = tmp_path / 'dist.py'
    script.write_text(DIST.format(imp=imp, out=str(tmp_path)))
    env = {**__import__('os').environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node',
                           '2', '--master_port', str(_free_port()), str(script)],
                          capture_output=True, text=True, env=env, timeout=300)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_distributed_launcher_fails_on_cpu_without_the_fix(tmp_path):
    proc = _torchrun(tmp_path, 'pass')
    assert proc.returncode != 0
    assert 'NVIDIA driver' in proc.stderr or 'CUDA' in proc.stderr, proc.stderr[-2000:]


def test_distributed_launcher_on_cpu_with_the_fix(tmp_path):
    proc = _torchrun(tmp_path, 'import mmdet_regptq')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f'rank{r}.txt').read_text() for r in (0, 1)] == ['world 2 sum 3'] * 2
