"""``mmdet_regptq.bench.child``: the row a benchmark's subprocess prints, read back."""
import sys

import pytest

from mmdet_regptq.bench.child import run_child


def test_the_last_result_row_comes_back(tmp_path):
    code = "print('RESULT {\"ap\": 1}'); print('noise'); print('RESULT {\"ap\": 2}')"
    row = run_child([sys.executable, '-c', code], tmp_path / 'a.log', tmp_path, 'cell')
    assert row == {'ap': 2}


@pytest.mark.parametrize('code', ["print('RESULT {\"ap\": 1}'); raise SystemExit(3)",
                                  "print('no row')"])
def test_a_failed_child_names_the_cell_and_its_log(tmp_path, code):
    log = tmp_path / 'b.log'
    with pytest.raises(RuntimeError, match=f'retinanet QDrop w4a4 failed .*see {log}'):
        run_child([sys.executable, '-c', code], log, tmp_path, 'retinanet QDrop w4a4')
