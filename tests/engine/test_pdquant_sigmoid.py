"""The engine gives PD-Quant the detector's score type: RetinaNet's sigmoid scores get the
per-class binary KL, not a softmax over independent sigmoid logits."""
from __future__ import annotations

from engine_utils import FAST_QUANT, build_detector

from mmdet_regptq.calib import PDQuant
from mmdet_regptq.engine.ptq import quantize_detector


def test_retinanet_pdquant_gets_the_sigmoid_kl(tiny_cfg, tiny_batches, monkeypatch):
    seen = []

    def calibrate(self, model, batches, forward_fn, **kwargs):
        seen.append([t for t in self.losses(None, output_fn=kwargs['output_fn'],
                                             global_loss=None) if hasattr(t, 'sigmoid')])
        return []

    monkeypatch.setattr(PDQuant, 'calibrate', calibrate)
    method = dict(type='PDQuant', iters=2, progress=False, log_interval=0)
    quantize_detector(build_detector(tiny_cfg), tiny_batches, quant=FAST_QUANT, method=method)
    (kl,), = seen
    assert kl.sigmoid is True and kl.weight == 10.0
