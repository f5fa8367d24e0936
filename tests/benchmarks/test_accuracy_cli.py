"""The accuracy / ablation benchmarks' method specs: variants reach the hook's method cfg."""
import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'benchmarks'))
import ablation  # noqa: E402
import accuracy  # noqa: E402


def test_variant_specs_parse_to_label_type_and_options():
    assert accuracy.parse_method('QDrop') == ('QDrop', 'QDrop', {})
    assert accuracy.parse_method('R-k1=RegPTQ{"llaq_cfg": {"k_candidates": [1.0]}}') == (
        'R-k1', 'RegPTQ', {'llaq_cfg': {'k_candidates': [1.0]}})
    labels = [accuracy.parse_method(v)[0] for v in ablation.VARIANTS]
    assert len(set(labels)) == len(labels)


@pytest.mark.parametrize('bad', ['RegPTQ{llaq: false}', 'a b', 'X=RegPTQ{"x": }'])
def test_bad_specs_name_the_option(bad):
    with pytest.raises(argparse.ArgumentTypeError, match='--methods'):
        accuracy.parse_method(bad)


def test_every_ablation_variant_builds_a_registered_method():
    from mmdet_regptq.registry import PTQ_METHODS
    for spec in ablation.VARIANTS:
        _, kind, options = accuracy.parse_method(spec)
        method = PTQ_METHODS.build(dict(type=kind, iters=1, **options))
        assert type(method).__name__ == kind
