"""Data-parallel calibration (``mmdet_regptq.calib.dist``): image sharding, observer merging,
and real 2-process gloo runs of the toy model (torchrun) against one process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from calib_toy import forward_fn, make_batches, make_float, make_quant, output_fn

from mmdet_regptq.calib import build_method
from mmdet_regptq.calib.dist import check_identical, shard_indices
from mmdet_regptq.quant import ActivationObserver

WORKER = Path(__file__).with_name('dist_worker.py')
#: Fisher-weighted block reconstruction without random masks: 2 ranks x 1 image per draw
#: compute the same averaged gradient as 1 process x 2 images
BRECQ = dict(type='BRECQ', fisher=True, iters=20, lr_alpha=1e-2, progress=False,
             log_interval=0)
QDROP = dict(type='QDrop', iters=10, lr_alpha=1e-2, progress=False, log_interval=0)


def test_every_batch_is_split_over_the_ranks_when_they_divide_it():
    idx = list(range(10, 18))
    assert shard_indices(idx, 2, 0, 2) == ([10, 12, 14, 16], 1)
    assert shard_indices(idx, 2, 1, 2) == ([11, 13, 15, 17], 1)
    assert sorted(i for r in range(4) for i in shard_indices(idx, 4, r, 4)[0]) == idx
    assert shard_indices(idx, 2) == (idx, 2)   # no process group: unchanged


def test_whole_batches_are_dealt_round_robin_otherwise():
    idx = list(range(10, 18))
    assert shard_indices(idx, 2, 0, 3) == ([10, 11, 16, 17], 2)
    assert shard_indices(idx, 2, 2, 3) == ([14, 15], 2)
    with pytest.raises(ValueError, match=r'calib.num_images=3 leaves rank 2 of 3 without a '
                                         r'calibration image .*num_images >= 5'):
        shard_indices([1, 2, 3], 2, 2, 3)
    with pytest.raises(ValueError, match=r'num_images=1 leaves rank 1 of 2 .*num_images >= 2'):
        shard_indices([5], 2, 1, 2)


def test_merged_observers_are_the_observer_of_all_inputs():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 4, 5, 5, generator=gen) * (i + 1) for i in range(4)]
    whole, a, b = ActivationObserver(), ActivationObserver(), ActivationObserver()
    for i, x in enumerate(xs):
        whole.update(x)
        (a if i % 2 == 0 else b).update(x)
    states = [a.state(), b.state()]
    a.merge(states)
    b.merge(states)
    assert torch.equal(a.sample(), b.sample()) and a.num_calls == 4
    # under the size bound nothing is dropped: the same values as one observer of all
    assert torch.equal(a.sample().sort().values, whole.sample().sort().values)
    small = [ActivationObserver(max_elements=60) for _ in range(2)]
    for i, x in enumerate(xs):
        small[i % 2].update(x)
    small[0].merge([s.state() for s in small])
    sample = small[0].sample()
    assert sample.numel() == 60 + 2
    assert sample.min() == torch.cat(xs).min() and sample.max() == torch.cat(xs).max()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory) -> Path:
    """BRECQ (Fisher) and QDrop calibrated by 2 gloo processes, 4 toy images each."""
    out = tmp_path_factory.mktemp('dist')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           f'--master_port={_free_port()}', str(WORKER), str(out), json.dumps([BRECQ, QDROP])]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


@pytest.mark.parametrize('index', [0, 1], ids=['BRECQ', 'QDrop'])
def test_both_ranks_end_with_identical_tensors(two_ranks, index):
    r0, r1 = (torch.load(two_ranks / f'{index}_rank{r}.pt') for r in (0, 1))
    assert r0.keys() == r1.keys()
    assert [k for k in r0 if not torch.equal(r0[k], r1[k])] == []


def test_a_rank_that_differs_is_refused_on_every_rank(two_ranks):
    for rank in (0, 1):
        report = json.loads((two_ranks / f'rank{rank}.json').read_text())
        assert report['restored']   # broadcast_state re-initialised rank 1's quantizers
        message = report['mismatch']
        assert message is not None and 'ranks ended with different tensors' in message
        assert '1 entries differ' in message


def test_two_ranks_with_half_the_images_each_match_one_process(two_ranks, single_thread):
    dist_state = torch.load(two_ranks / '0_rank0.pt')
    model = make_quant(make_float())
    build_method(BRECQ).calibrate(model, make_batches(4), forward_fn, output_fn=output_fn)
    check_identical(model)   # no process group: a no-op
    single = model.state_dict()
    assert single.keys() == dist_state.keys()
    floats = [k for k, v in single.items() if v.is_floating_point()]
    # the same images in the same draws: only the summation order differs
    far = [k for k in floats if not torch.allclose(single[k], dist_state[k], rtol=1e-4,
                                                   atol=1e-6)]
    assert far == []
    alphas = [k for k in floats if k.endswith('alpha')]   # hardened rounding
    same = sum(int(torch.eq(single[k], dist_state[k]).sum()) for k in alphas)
    assert alphas and same >= 0.999 * sum(single[k].numel() for k in alphas)
