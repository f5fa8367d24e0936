"""benchmarks/ort_stem.py: both forms of a stem give the same codes; the CPU it names."""
import pytest

from mmdet_regptq.bench.cpu import cpu_name


@pytest.fixture(scope='module')
def script(load_script):
    return load_script('benchmarks/ort_stem.py')


def test_times_both_forms_and_checks_the_codes(script, capsys):
    assert script.main(['--size', '64', '--kernel', '6', '--pad', '2', '--runs', '2']) == 0
    out = capsys.readouterr().out
    assert 'codes identical' in out and '6x6 stride 2 at 64x64' in out
    assert 'QLinearConv, stride 2' in out and 'SpaceToDepth + QLinearConv, stride 1' in out


def test_a_stem_that_leaves_input_unread_is_refused(script):
    with pytest.raises(SystemExit, match='--kernel 2 --pad 0 at --size 9: not expressible'):
        script.main(['--size', '9', '--kernel', '2', '--pad', '0', '--runs', '1'])


def test_cpu_name_reads_the_model_and_the_vnni_flag(tmp_path):
    info = tmp_path / 'cpuinfo'
    info.write_text('processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: avx2 avx512_vnni\n')
    assert cpu_name(str(info)) == 'AMD EPYC 9R14 (AVX-512 VNNI: yes)'
    info.write_text('model name\t: Intel Xeon E5-2690 v4\nflags\t\t: avx2 fma\n')
    assert cpu_name(str(info)) == 'Intel Xeon E5-2690 v4 (AVX-512 VNNI: no)'
