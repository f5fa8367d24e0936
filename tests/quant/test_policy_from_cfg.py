"""``QuantPolicy.from_cfg`` is the one check of the hook's ``quant=dict(...)``: its fields,
defaults and errors (``engine.build_policy`` and ``RegPTQHook`` call it)."""
import dataclasses

import pytest

from mmdet_regptq.errors import UnknownFieldError
from mmdet_regptq.quant import QuantPolicy


def test_defaults_come_from_the_dataclass():
    policy = QuantPolicy.from_cfg(None)
    assert policy == QuantPolicy.from_cfg({}) == QuantPolicy()
    assert (policy.w_bits, policy.a_bits, policy.first_layer_bits) == (4, 4, 8)
    assert policy.final_layers == [] and not policy.quantize_final


def test_every_field_is_a_config_key():
    cfg = dict(w_bits=3, a_bits=6, first_layer_bits=None, first_layer='backbone.stem',
               fp_layers=['neck.*'], final_layers=['head.cls'], quantize_final=True,
               overrides={'head.*': dict(w_bits=8)},
               weight=dict(type='Uniform', per_channel=True, scale_method='mse'),
               act=dict(type='Uniform', scale_method='minmax'), fold_bn=False,
               w_reduce_range=True)
    assert set(cfg) == {f.name for f in dataclasses.fields(QuantPolicy)}
    policy = QuantPolicy.from_cfg(cfg)
    assert {k: getattr(policy, k) for k in cfg} == cfg


def test_unknown_field_is_a_key_and_a_value_error_listing_the_fields():
    with pytest.raises(UnknownFieldError) as info:
        QuantPolicy.from_cfg(dict(wbits=4, a_bits=4))
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    assert str(err) == ("quant: unknown field(s) ['wbits']; allowed: "
                        f'{[f.name for f in dataclasses.fields(QuantPolicy)]}')
    with pytest.raises(ValueError, match=r"quant=\[4, 4\] must be a dict of policy fields"):
        QuantPolicy.from_cfg([4, 4])
    with pytest.raises(ValueError, match=r'a_bits=1 is out of range; allowed 2\.\.16'):
        QuantPolicy.from_cfg(dict(a_bits=1))
