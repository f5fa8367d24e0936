"""The accuracy / ablation benchmarks' method specs: variants reach the hook's method cfg."""
import argparse

import pytest

from mmdet_regptq.bench.specs import parse_bits, parse_method


@pytest.fixture(scope='module')
def ablation(load_script):
    return load_script('benchmarks/ablation.py')


def test_variant_specs_parse_to_label_type_and_options(ablation):
    assert parse_method('QDrop') == ('QDrop', 'QDrop', {})
    assert parse_method('R-k1=RegPTQ{"llaq": {"quantizer": {"k_candidates": [1.0]}}}') == (
        'R-k1', 'RegPTQ', {'llaq': {'quantizer': {'k_candidates': [1.0]}}})
    labels = [parse_method(v)[0] for v in ablation.VARIANTS]
    assert len(set(labels)) == len(labels)


@pytest.mark.parametrize('bad', ['RegPTQ{llaq: false}', 'a b', 'X=RegPTQ{"x": }'])
def test_bad_specs_name_the_option(bad):
    with pytest.raises(argparse.ArgumentTypeError, match='--methods'):
        parse_method(bad)


def test_bits_parse_and_bad_bits_name_the_option():
    assert parse_bits('W2A4') == (2, 4)
    with pytest.raises(argparse.ArgumentTypeError, match="--bits 'w4': expected like w4a4"):
        parse_bits('w4')


def test_every_ablation_variant_builds_a_registered_method(ablation):
    from mmdet_regptq.registry import PTQ_METHODS
    for spec in ablation.VARIANTS:
        _, kind, options = parse_method(spec)
        method = PTQ_METHODS.build(dict(type=kind, iters=1, **options))
        assert type(method).__name__ == kind


def test_from_csv_merges_pieces_and_draws_the_plot(tmp_path, capsys, load_script):
    accuracy = load_script('benchmarks/accuracy.py')
    header = ','.join(accuracy.FIELDS)

    def row(method, ap):
        values = dict(detector='fcos', method=method, bits='w4a4', bbox_mAP=ap, bbox_mAP_50=0.8,
                      bbox_mAP_75=0.45, iters=100, num_images=32, calib_seconds=1.0,
                      peak_rss_mb=10.0, seed=0)
        return ','.join(str(values[k]) for k in accuracy.FIELDS)

    first, second = tmp_path / 'a.csv', tmp_path / 'b.csv'
    first.write_text('\n'.join([header, row('QDrop', 0.5), row('MinMax', 0.3)]) + '\n')
    second.write_text('\n'.join([header, row('QDrop', 0.6)]) + '\n')      # a rerun wins
    accuracy.main(['--from-csv', str(first), str(second), '--out', str(tmp_path / 'out')])
    table = capsys.readouterr().out
    assert '| fcos | QDrop | w4a4 | 60.0 |' in table and '| 50.0 |' not in table
    assert '| fcos | MinMax | w4a4 | 30.0 |' in table
    assert (tmp_path / 'out' / 'accuracy.png').stat().st_size > 0
