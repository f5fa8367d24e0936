"""benchmarks/plot_iterations.py: which rows become curves, and the PNG it writes."""
import csv

import pytest

FIELDS = ['detector', 'method', 'bits', 'bbox_mAP', 'iters', 'num_images']


@pytest.fixture(scope='module')
def script(load_script):
    return load_script('benchmarks/plot_iterations.py')


def _write(path, rows):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(dict(zip(FIELDS, r)) for r in rows)


def test_curves_keep_methods_with_two_iteration_counts(script, tmp_path):
    path = tmp_path / 'results.csv'
    _write(path, [('d', 'FP', 'fp32', 0.4, 0), ('d', 'MinMax', 'w4a8', 0.1, 0),
                  ('d', 'QDrop', 'w4a8', 0.2, 100), ('d', 'QDrop', 'w4a8', 0.1, 20),
                  ('d', 'RegPTQ', 'w4a8', 0.15, 20), ('e', 'QDrop', 'w4a8', 0.3, 500)])
    fp, curves = script.read_curves(path, 'd')
    assert fp == pytest.approx(40.0)
    assert list(curves) == [('QDrop', 'w4a8')]            # one count only: no curve
    assert curves[('QDrop', 'w4a8')] == [(20, pytest.approx(10.0)), (100, pytest.approx(20.0))]
    _, all_rows = script.read_curves(path, None)            # detector e's point joins in
    assert [it for it, _ in all_rows[('QDrop', 'w4a8')]] == [20, 100, 500]


def test_main_writes_a_png_and_refuses_a_csv_without_curves(script, tmp_path, capsys):
    path, out = tmp_path / 'results.csv', tmp_path / 'plots' / 'it.png'
    _write(path, [('d', 'FP', 'fp32', 0.4, 0), ('d', 'QDrop', 'w4a4', 0.05, 20),
                  ('d', 'QDrop', 'w4a4', 0.1, 100)])
    script.main([str(path), '--out', str(out)])
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'QDrop     w4a4  20: 5.0  100: 10.0' in capsys.readouterr().out
    _write(path, [('d', 'QDrop', 'w4a4', 0.05, 20)])
    with pytest.raises(SystemExit):
        script.main([str(path), '--out', str(out)])
    assert 'no (method, bits) at two or more' in capsys.readouterr().err


def test_num_images_keeps_one_calibration_set_per_curve(script, tmp_path):
    """A run on more images at an iteration count already measured does not replace the
    point of the curve it is not part of."""
    path = tmp_path / 'results.csv'
    _write(path, [('d', 'FP', 'fp32', 0.4, 0, 0), ('d', 'QDrop', 'w4a8', 0.1, 20, 16),
                  ('d', 'QDrop', 'w4a8', 0.3, 2000, 16), ('d', 'QDrop', 'w4a8', 0.2, 2000, 128)])
    fp, curves = script.read_curves(path, 'd', 16)
    assert fp == pytest.approx(40.0)
    assert curves[('QDrop', 'w4a8')] == [(20, pytest.approx(10.0)), (2000, pytest.approx(30.0))]
    _, mixed = script.read_curves(path, 'd')
    assert mixed[('QDrop', 'w4a8')][-1] == (2000, pytest.approx(20.0))
