"""benchmarks/gpu_calibration.py: runs end to end on the CPU (a bundled detector, tiny settings),
times every unit of QDrop and Reg-PTQ; bad flags are refused with the allowed values."""
import csv

import pytest


@pytest.fixture(scope='module')
def script(load_script):
    return load_script('benchmarks/gpu_calibration.py')


def test_cpu_check_times_the_first_units_of_qdrop_and_regptq(script, tmp_path, capsys,
                                                             single_thread):
    out = tmp_path / 'calibration.csv'
    assert script.main(['--device', 'cpu', '--iters', '2', '--num-images', '2', '--units', '2',
                        '--size', '96x128', '--model', 'retinanet', '--procs', '1',
                        '--csv', str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r['method'], r['unit']) for r in rows] == [
        ('QDrop', '1'), ('QDrop', '2'), ('RegPTQ', '1'), ('RegPTQ', '2')]
    assert all(float(r['seconds']) > 0 and r['size'] == '96x128' for r in rows)
    text = capsys.readouterr().out
    assert 'calibration time, bundled retinanet W4A4 (CPU)' in text
    summary = [line.split() for line in text.splitlines()
               if line.split()[:2] in (['QDrop', '1'], ['RegPTQ', '1'])]
    assert len(summary) == 2 and all(row[5].startswith('2/') for row in summary), summary


@pytest.mark.parametrize('flags, message', [
    (['--methods', 'QDrop,Foo'], "--methods 'QDrop,Foo': allowed QDrop, RegPTQ"),
    (['--size', '800'], "--size '800': allowed HxW"),
    (['--procs', 'many'], "--procs 'many': allowed 'auto' or a count"),
    (['--num-images', '0'], '--num-images=0 is out of range'),
])
def test_bad_flags_name_the_allowed_values(script, capsys, flags, message):
    with pytest.raises(SystemExit):
        script.main(['--device', 'cpu', *flags])
    assert message in capsys.readouterr().err
