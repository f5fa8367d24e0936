"""benchmarks/deploy.py's ``--tvm-target-cpu``: one INT4 TVM row per ``MCPU[:KERNEL]``."""
import pytest


@pytest.fixture(scope='module')
def deploy(load_script):
    return load_script('benchmarks/deploy.py')


def test_default_host_build_keeps_the_plain_row_name(deploy):
    assert deploy.tvm_int4_builds('host') == [('INT4 TVM', None, 'auto')]


def test_each_entry_is_one_row_for_its_cpu_and_kernel(deploy):
    from tvm.target import codegen

    host = str(codegen.llvm_get_system_cpu())
    assert deploy.tvm_int4_builds('host, haswell:avx2,haswell:generic') == [
        (f'INT4 TVM {host}', None, 'auto'),
        ('INT4 TVM haswell avx2', 'haswell', 'avx2'),
        ('INT4 TVM haswell generic', 'haswell', 'generic')]


@pytest.mark.parametrize('bad', ['haswell:sse', ':avx2', 'host,'])
def test_bad_entries_name_the_option_and_the_kernels(deploy, bad):
    with pytest.raises(SystemExit, match=r'--tvm-target-cpu.*auto, vnni, avx2, generic'):
        deploy.tvm_int4_builds(bad)
