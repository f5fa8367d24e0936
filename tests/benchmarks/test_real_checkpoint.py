"""The benchmarks' real detectors: one place finds and converts the release checkpoint."""
import pytest

from mmdet_regptq.bench.models import REAL_DETECTORS, real_checkpoint, realdata_dir


def test_a_missing_release_file_names_the_folder_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv('REGPTQ_REALDATA', str(tmp_path / 'elsewhere'))
    assert realdata_dir() == tmp_path / 'elsewhere'
    with pytest.raises(SystemExit, match=r'yolov5n: .*elsewhere/yolov5n/yolov5n\.pt not found '
                                         r'\(set REGPTQ_REALDATA'):
        real_checkpoint('yolov5n', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_a_converted_checkpoint_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv('REGPTQ_REALDATA', str(tmp_path / 'nothing-here'))
    done = tmp_path / 'out' / 'yolov5n' / 'yolov5n_mmdet.pth'
    done.parent.mkdir(parents=True)
    done.write_bytes(b'converted before')
    assert real_checkpoint('yolov5n', tmp_path / 'out') == done
    assert set(REAL_DETECTORS) == {'yolov5n'}
