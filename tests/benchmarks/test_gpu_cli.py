"""benchmarks/gpu.py: every row runs (checked on the CPU), bad names are refused."""
import csv

import pytest


@pytest.fixture(scope='module')
def gpu(load_script):
    return load_script('benchmarks/gpu.py')


def test_cpu_check_times_every_variant_of_a_one_and_a_two_stage_detector(gpu, tmp_path, capsys):
    out = tmp_path / 'gpu.csv'
    assert gpu.main(['--device', 'cpu', '--models', 'retinanet,frcnn', '--size', '64',
                     '--runs', '1', '--csv', str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r['model'], r['variant']) for r in rows] == [
        (m, v) for m in ('retinanet', 'frcnn')
        for v in ('FP32', 'W8A8 fake-quant', 'W4A4 fake-quant')]  # FP16: CUDA only
    assert all(float(r['ms']) > 0 for r in rows)


def test_unknown_model_names_the_allowed_ones(gpu, tmp_path):
    with pytest.raises(SystemExit, match="--models 'yolo': allowed r50, retinanet"):
        gpu.main(['--device', 'cpu', '--models', 'yolo', '--csv', str(tmp_path / 'x.csv')])
