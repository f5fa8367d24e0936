"""``tools/test.py --launcher pytorch`` under torchrun (2 gloo processes) with RegPTQHook:
the ranks share the calibration, end identical (checked in the run), rank 0 writes
``quantized.pth``, and mmdet's TestLoop evaluates the result."""
import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
DETECTOR = 'retinanet_r18-16_fpn64_synthetic'


def test_two_processes_calibrate_together_and_rank0_writes_the_result(load_script, tmp_path,
                                                                      synthetic_data):
    bench = load_script('benchmarks/multiprocess.py')
    base, checkpoint, data_lines = bench.detector_files(DETECTOR, tmp_path, 8)
    assert "ann_file=" in data_lines
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(bench.CONFIG.format(base=str(base), method='QDrop', iters=2, num_images=4,
                                       batch_size=2, w_bits=4, a_bits=4) + data_lines)
    import mmdet
    test_py = Path(mmdet.__file__).parent / '.mim' / 'tools' / 'test.py'
    work_dir = tmp_path / 'work'
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
         f'--master_port={bench._free_port()}', str(test_py), str(cfg),
         checkpoint, '--launcher', 'pytorch',
         '--work-dir', str(work_dir)],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore'),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    log = bench._log(work_dir)
    assert re.search(r'calibration took [0-9.]+ s \(CPU time of this process [0-9.]+ s\), '
                     r'data-parallel over 2 processes', log)
    # each rank calibrated on 2 of the 4 images: 2 batches of 1
    assert 'QDrop: ' in log and '2 calibration batches' in log
    assert 0.0 <= bench._ap(log) <= 1.0
    from mmdet_regptq.engine.checkpoint import read_quantized
    assert read_quantized(work_dir / 'quantized.pth')['meta']['method'] == 'QDrop'
    assert not list(work_dir.glob('*.tmp'))


def test_bits_flag_parses_and_names_itself(load_script):
    import argparse

    import pytest
    bench = load_script('benchmarks/multiprocess.py')
    assert bench.parse_bits('w4a8') == (4, 8)
    with pytest.raises(argparse.ArgumentTypeError, match="--bits 'int8': expected like w4a4"):
        bench.parse_bits('int8')
