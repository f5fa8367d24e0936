"""`analyze.py sensitivity` on the bundled RetinaNet: one layer quantized at a time."""
from __future__ import annotations

import re

from analysis_utils import assert_png, assert_range, bundled, read_csv, run_cli
from mmdet_regptq.analysis import SensitivityConfig, run_sensitivity
from mmdet_regptq.engine import build_policy
from mmdet_regptq.models import find_adapter


def test_sensitivity_cli_retinanet(tmp_path, capsys):
    config, ckpt = bundled('retinanet')
    assert run_cli('sensitivity', config, ckpt, '--bits', '4', '--out-dir', str(tmp_path),
                   '--proxy-images', '4', '--top-k', '2') == 0
    assert_png(tmp_path / 'sensitivity.png')
    rows = read_csv(tmp_path / 'sensitivity.csv')
    assert len(rows) == 33  # every conv but the two final ones (kept FP)
    drops = [float(r['drop']) for r in rows]
    assert drops == sorted(drops, reverse=True)
    assert_range(drops, 0.0, 10.0, 'drop')
    assert {r['w_bits'] for r in rows} == {'4', '8'}  # the first layer stays 8 bit
    out = capsys.readouterr().out
    line = next(ln.strip() for ln in out.splitlines() if ln.strip().startswith('quant=dict('))
    assert re.fullmatch(r"quant=dict\(overrides=\{'[\w.]+': dict\(w_bits=8\), "
                        r"'[\w.]+': dict\(w_bits=8\)\}\)", line)


def test_suggested_overrides_are_what_the_hook_accepts(retina_bench):
    res = run_sensitivity(retina_bench, SensitivityConfig(
        bits=3, a_bits=6, top_k=1, layers=r'bbox_head\..*', quant=dict(first_layer_bits=None)))
    assert len(res.table.rows) == 4
    assert len(res.overrides) == 1
    name = next(iter(res.overrides))
    scope = {}
    exec(res.suggestion, {}, scope)  # the printed line is valid config syntax
    policy = build_policy(dict(scope['quant'], w_bits=3, a_bits=6), find_adapter(
        retina_bench.model))
    assert policy.bits_for(name) == (8, 8)
    assert_range(res.table.column('drop'), 0.0, 10.0, 'drop')
    assert {r['a_bits'] for r in res.table.rows} == {6}


def test_ap_ranking_suggests_only_drops_above_the_evaluation_noise(retina_bench):
    res = run_sensitivity(retina_bench, SensitivityConfig(bits=2, layers=r'bbox_head\..*',
                                                          with_ap=True, top_k=4))
    assert res.measure == 'mAP'
    assert_range(res.table.column('mAP'), 0.0, 1.0, 'mAP')
    drops = {r['layer']: r['drop'] for r in res.table.rows}
    floor = max([0.0] + [-d for d in drops.values()])
    assert all(drops[name] > floor for name in res.overrides)
    assert res.overrides or 'evaluation noise' in res.suggestion
