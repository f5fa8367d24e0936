"""The runtime's pre-NMS top-k: the same values as a full sort, with or without the
sampled-threshold prefilter on long arrays."""
from __future__ import annotations

import numpy as np
import pytest

from mmdet_regptq.deploy.runtime.postprocess import TOPK_PREFILTER, _top_k


@pytest.mark.parametrize('n,k', [(885_000, 1000), (64_000, 1000), (63_999, 1000),
                                 (200_000, 7), (5_000, 5_000), (5_000, 0)])
@pytest.mark.parametrize('dist', ['normal', 'skewed', 'few_levels'])
def test_top_k_equals_the_full_sort(n, k, dist):
    rng = np.random.default_rng(n + k)
    values = {'normal': rng.standard_normal(n),
              'skewed': rng.exponential(size=n) ** 4,      # a long tail: few large values
              'few_levels': rng.integers(0, 5, n).astype(np.float64)}[dist].astype(np.float32)
    idx = _top_k(values, k)
    expected = np.sort(values)[::-1][:k] if 0 < k < n else np.sort(values)[::-1]
    np.testing.assert_array_equal(values[idx], expected)        # the k largest, largest first
    assert len(np.unique(idx)) == len(idx)


def test_prefilter_falls_back_when_the_sample_threshold_keeps_too_few(monkeypatch):
    """The sampled positions hold the large values, so the threshold (the sample's
    ~100th largest) keeps fewer than k values: the full partition must run, and the
    answer is still the k largest."""
    k, n = 1000, 1_600_000
    step = n // (16 * k)
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, n).astype(np.float32)
    values[::step] = rng.uniform(2, 3, values[::step].size)
    sizes = []
    argpartition = np.argpartition
    monkeypatch.setattr(np, 'argpartition',
                        lambda a, *args, **kw: sizes.append(a.size) or argpartition(a, *args, **kw))
    idx = _top_k(values, k)
    assert sizes == [n]                                   # only the full partition ran
    np.testing.assert_array_equal(values[idx], np.sort(values)[::-1][:k])
