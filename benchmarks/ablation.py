"""Which part of Reg-PTQ buys what: the method with one component switched off at a time.

Same calibration images, iterations and seed for every row (the train split; AP on the val
split), each run through mmdet's Runner + ``RegPTQHook`` like ``benchmarks/accuracy.py``,
whose options this script takes (``--detectors``, ``--bits``, ``--iters``, ...):

    python benchmarks/ablation.py --detectors retinanet --bits w2a4 --iters 100 \
        --num-images 32 --out work_dirs/ablation

Rows (``--methods`` replaces them):

- ``QDrop``: the baseline Reg-PTQ builds on (uniform grids + AdaRound, drop 0.5).
- ``RegPTQ``: the defaults (LLAQ on the regression branch, Fisher-weighted ``L_H`` + FGIC,
  ``L_G`` on every 32nd iteration).
- ``RegPTQ-noLLAQ``: uniform grids + AdaRound on the regression branch too.
- ``RegPTQ-noFGIC``: no global loss and plain output MSE (LLAQ only).
- ``RegPTQ-noFilter``: FGIC without the confidence / IoU filters.
- ``RegPTQ-psi`` / ``RegPTQ-learned``: LLAQ rounding by ``psi`` (the paper) / learned at
  every bit width; the default ``'auto'`` learns it on 2-bit layers only.
- ``RegPTQ-k1``: LLAQ initialised at the paper's ``k = 1`` instead of the ``k`` search.
- ``RegPTQ-g1``: ``L_G`` on every iteration, as in the paper (``schedule.global_interval=1``): about
  3x the default's time.
- ``RegPTQ-s4``: one Fisher-gradient pass per 4 units (``experimental.fisher_share=4``): the time knob.
- ``RegPTQ-call``: the iterations without ``L_G`` draw one cached call, as QDrop does
  (``experimental.local_draw='call'``), instead of all of a batch's calls (a shared head's FPN levels).
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from mmdet_regptq.bench.models import REPO_ROOT

VARIANTS = [
    'QDrop',
    'RegPTQ',
    'RegPTQ-noLLAQ=RegPTQ{"llaq": {"target": null}}',
    'RegPTQ-noFGIC=RegPTQ{"schedule": {"global_loss": false, "fisher": false}}',
    'RegPTQ-noFilter=RegPTQ{"fgic": {"conf_filter": false, "iou_filter": false}}',
    'RegPTQ-psi=RegPTQ{"experimental": {"llaq_rounding": "psi"}}',
    'RegPTQ-learned=RegPTQ{"experimental": {"llaq_rounding": "learned"}}',
    'RegPTQ-k1=RegPTQ{"llaq": {"quantizer": {"k_candidates": [1.0]}}}',
    'RegPTQ-g1=RegPTQ{"schedule": {"global_interval": 1}}',
    'RegPTQ-s4=RegPTQ{"experimental": {"fisher_share": 4}}',
    'RegPTQ-call=RegPTQ{"experimental": {"local_draw": "call"}}',
]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = ['--detectors', 'retinanet', '--bits', 'w2a4', '--iters', '100',
                '--num-images', '32', '--out', str(REPO_ROOT / 'work_dirs' / 'ablation')]
    if '--methods' not in argv:
        defaults += ['--methods', *VARIANTS]
    # argparse keeps the last occurrence: the user's options come after the defaults
    accuracy = runpy.run_path(str(Path(__file__).with_name('accuracy.py')))
    accuracy['main'](defaults + argv)


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', '2')
    main()
