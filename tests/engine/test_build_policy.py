"""``engine.build_policy``: the policy of the hook's ``quant=dict(...)`` without a model
(config load), and with the detector adapter's final prediction layers added."""
from types import SimpleNamespace

import pytest

from mmdet_regptq.engine import build_policy
from mmdet_regptq.errors import UnknownFieldError

ADAPTER = SimpleNamespace(fp_layer_patterns=lambda: [r'bbox_head\.retina_(cls|reg)'])


def test_without_a_model_the_fields_are_checked():
    assert build_policy(dict(w_bits=3)).w_bits == 3 and build_policy(None).final_layers == []
    with pytest.raises(UnknownFieldError, match=r"quant: unknown field\(s\) \['abits'\]"):
        build_policy(dict(abits=4))
    with pytest.raises(ValueError, match=r'w_bits=9 is out of range; allowed 2\.\.8'):
        build_policy(dict(w_bits=9))


def test_the_adapter_final_layers_stay_fp_unless_quantize_final():
    policy = build_policy(dict(final_layers=['extra'], fp_layers=['neck.*']), ADAPTER)
    assert policy.final_layers == [r'bbox_head\.retina_(cls|reg)', 'extra']
    assert policy.fp_reason('bbox_head.retina_reg') == 'final_layers'
    assert policy.fp_reason('neck.lateral') == 'fp_layers'
    assert policy.fp_reason('bbox_head.reg_convs.0') is None
    quantized = build_policy(dict(quantize_final=True), ADAPTER)
    assert quantized.fp_reason('bbox_head.retina_reg') is None
