"""QuantPolicy validation: every bad field raises ValueError naming the field."""
import pytest

from mmdet_regptq.quant import QuantPolicy


def test_defaults_are_valid():
    policy = QuantPolicy()
    assert (policy.w_bits, policy.a_bits, policy.first_layer_bits) == (4, 4, 8)
    assert policy.weight['per_channel'] and not policy.act['per_channel']
    assert policy.weight['scale_method'] == 'lp' and policy.fold_bn


def test_message_format():
    with pytest.raises(ValueError, match=r'^w_bits=9 is out of range; allowed 2\.\.8$'):
        QuantPolicy(w_bits=9)


@pytest.mark.parametrize('kwargs,field', [
    (dict(w_bits=1), 'w_bits'),
    (dict(w_bits=4.0), 'w_bits'),
    (dict(a_bits=17), 'a_bits'),
    (dict(a_bits=1), 'a_bits'),
    (dict(first_layer_bits=16), 'first_layer_bits'),
    (dict(first_layer=3), 'first_layer'),
    (dict(fp_layers='head.*'), 'fp_layers'),
    (dict(fp_layers=['(']), 'fp_layers'),
    (dict(final_layers=[1]), 'final_layers'),
    (dict(quantize_final='yes'), 'quantize_final'),
    (dict(fold_bn=1), 'fold_bn'),
    (dict(overrides=['x']), 'overrides'),
    (dict(overrides={'x': {'bits': 4}}), 'overrides'),
    (dict(overrides={'x': {'w_bits': 9}}), r"overrides\['x'\].w_bits"),
    (dict(overrides={'x': {'a_bits': 20}}), 'a_bits'),
    (dict(weight=dict(type='Nope')), 'weight'),
    (dict(weight=dict(per_channel=True)), 'weight'),
    (dict(weight=dict(type='Uniform', bits=4)), 'weight'),
    (dict(act=dict(type='Uniform', scale_method='bad')), 'act'),
    (dict(act=dict(type='Uniform', unknown_option=1)), 'act'),
])
def test_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantPolicy(**kwargs)


def test_from_cfg_unknown_key_and_passthrough():
    policy = QuantPolicy(w_bits=2)
    assert QuantPolicy.from_cfg(policy) is policy
    assert QuantPolicy.from_cfg(dict(a_bits=8)).a_bits == 8
    with pytest.raises(ValueError, match='wbits'):
        QuantPolicy.from_cfg(dict(wbits=4))


def test_per_layer_decisions():
    policy = QuantPolicy(w_bits=4, a_bits=4, fp_layers=[r'head\.reg'],
                         final_layers=[r'head\.cls'],
                         overrides={r'neck\..*': {'w_bits': 8}, r'neck\.a': {'a_bits': 2}})
    assert policy.fp_reason('head.reg') == 'fp_layers'
    assert policy.fp_reason('head.cls') == 'final_layers'
    assert policy.fp_reason('head.reg2') is None                 # fullmatch
    assert policy.bits_for('stem', is_first=True) == (8, 8)
    assert policy.bits_for('neck.a') == (8, 4)                   # first matching regex wins
    assert policy.bits_for('backbone.x') == (4, 4)
    final = QuantPolicy(final_layers=[r'head\.cls'], quantize_final=True)
    assert final.fp_reason('head.cls') is None
