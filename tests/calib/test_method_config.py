"""RegPTQ's grouped options: defaults, validation, the flat spellings, ``build_method`` and the
engine interface every method has (``set_layer_defaults`` / ``global_loss_config`` /
``prepare_model``)."""
import dataclasses
import warnings

import pytest
import torch
from calib_toy import forward_fn, make_batches, make_float, make_quant

from mmdet_regptq.calib import (ExperimentalConfig, FGICConfig, LLAQConfig, PTQMethod, QDrop,
                                RegPTQ, RegPTQConfig, ScheduleConfig, build_method, output_mse)
from mmdet_regptq.calib.methods.regptq_config import FLAT_OPTIONS, RenamedOptionError
from mmdet_regptq.errors import UnknownFieldError
from mmdet_regptq.quant import LLAQuantizer, SEARCH_K, iter_quant_modules

#: Every Reg-PTQ option under its flat name with the value ``RegPTQ()`` computed with before
#: the options were grouped: the paper's settings (PAPER.md) and the project's documented
#: choices. ``RegPTQ()`` must still resolve to exactly these.
DEFAULTS = dict(
    global_loss=True, fisher=True, conf_filter=True, iou_filter=True, llaq='reg',
    lambda_=1.0, p=1.0, theta_c=2e-4, theta_i=0.1, normalize_boxes=True,
    entropy_offset=True, global_weight=1.0, global_interval=32, fisher_share=1,
    local_draw='batch', llaq_cfg={'k_candidates': SEARCH_K}, llaq_rounding='auto',
    lr_llaq=1e-3, head_layers=None, reg_layers=None, init_scale_method='lp', init_p=2.4)

#: a value other than the default for every flat option (mapped value where it differs)
CHANGED = dict(
    global_loss=False, fisher=False, conf_filter=False, iou_filter=False, llaq='head',
    lambda_=0.5, p=2.0, theta_c=1e-3, theta_i=0.3, normalize_boxes=False,
    entropy_offset=False, global_weight=0.1, global_interval=4, fisher_share=2,
    local_draw='call', llaq_cfg={'power_of_two': True}, llaq_rounding='psi', lr_llaq=0.0,
    head_layers=[r'head\..*'], reg_layers=['head.cls'], init_scale_method='mse', init_p=2.0)


def test_defaults_resolve_to_the_settings_reg_ptq_computed_with():
    method = RegPTQ()
    assert method.config.as_flat() == DEFAULTS
    assert set(DEFAULTS) == set(FLAT_OPTIONS) == set(CHANGED)
    assert method.config == RegPTQConfig()
    # what the reconstruction loop reads, and QDrop's settings underneath
    assert (method.tail_interval, method.fisher_share, method.local_draw) == (32, 1, 'batch')
    assert (method.drop_prob, method.fp_input_prob, method.iters) == (0.5, 0.5, 2000)
    assert method.needs_fisher() and method.llaq_type(2) == 'LLAQRound'
    assert method.llaq_type(3) == 'LLAQ'


@pytest.mark.parametrize('old', sorted(FLAT_OPTIONS))
def test_each_flat_spelling_is_refused_naming_its_group_field(old):
    group, name = FLAT_OPTIONS[old]
    value = CHANGED[old]
    with pytest.raises(RenamedOptionError, match=rf'{old}= -> {group}=dict\({name}='):
        RegPTQ(**{old: value})
    with pytest.raises(RenamedOptionError, match=rf'{old}= -> {group}=dict\({name}='):
        build_method(dict(type='RegPTQ', **{old: value}))
    expected = value if old != 'llaq' else 'head'
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # the grouped spelling warns about nothing
        grouped = RegPTQ(**{group: {name: expected}})
    assert grouped.config.as_flat() == {**DEFAULTS, old: value}


@pytest.mark.parametrize('value,target', [(True, 'reg'), (False, None), ('head', 'head')])
def test_llaq_as_bool_or_string_is_refused_naming_the_target(value, target):
    with pytest.raises(RenamedOptionError, match=rf"llaq= -> llaq=dict\(target={target!r}\)"):
        RegPTQ(llaq=value)
    assert RegPTQ(llaq=dict(target=target)).llaq.target == target


def test_every_group_takes_its_dataclass_or_a_dict():
    config = RegPTQConfig(fgic=FGICConfig(theta_c=1e-3), llaq=LLAQConfig(target='head'),
                          schedule=ScheduleConfig(global_interval=8),
                          experimental=ExperimentalConfig(local_draw='call'))
    from_objects = RegPTQ(**{g: getattr(config, g) for g in ('fgic', 'llaq', 'schedule',
                                                              'experimental')})
    from_dicts = RegPTQ(**{g: dataclasses.asdict(getattr(config, g))
                           for g in ('fgic', 'llaq', 'schedule', 'experimental')})
    assert from_objects.config == from_dicts.config == config
    assert from_dicts.fgic is from_dicts.config.fgic and from_dicts.tail_interval == 8


def test_a_flat_option_beside_its_group_is_still_refused():
    with pytest.raises(RenamedOptionError, match=r'theta_c= -> fgic=dict\(theta_c=0\.001\)'):
        RegPTQ(theta_c=1e-3, fgic=dict(theta_i=0.2))


@pytest.mark.parametrize('options,pattern', [
    (dict(fgic=dict(theta_c=2.0)), r'RegPTQ fgic: theta_c=2\.0 is out of range; allowed 0\.\.1'),
    (dict(fgic=dict(theta_c='x')), r'RegPTQ fgic: .*'),
    (dict(llaq=dict(target='all')),
     r"RegPTQ llaq: target='all' is unknown; allowed: \['reg', 'head', None\]"),
    (dict(llaq=dict(head_layers='head.*')), r'llaq: head_layers=.* must be a list of regex'),
    (dict(llaq=dict(reg_layers=['('])), r"reg_layers: '\(' is not a valid regex"),
    (dict(llaq=dict(lr=-1.0)), r'RegPTQ llaq: lr=-1\.0 must be a number >= 0'),
    (dict(llaq=dict(quantizer=dict(bits=4))), r"quantizer: 'bits' is set by the method"),
    (dict(llaq=dict(quantizer=dict(k_candidate=(1.0,)))),
     r"RegPTQ llaq: quantizer=.*k_candidate.* is invalid for 'LLAQ'"),
    (dict(schedule=dict(fisher='yes')), r"RegPTQ schedule: fisher='yes' is invalid; allowed "
                                        r'True/False'),
    (dict(schedule=dict(global_interval=0)), r'global_interval=0 must be an int >= 1'),
    (dict(schedule=dict(init_scale_method='l2')),
     r"init_scale_method='l2' is unknown; allowed: \[.*'lp'.*None\]"),
    (dict(schedule=dict(init_p=0)), r'init_p=0 must be a number > 0'),
    (dict(experimental=dict(llaq_rounding='nearest')),
     r"RegPTQ experimental: llaq_rounding='nearest' is unknown; allowed: \['psi', 'learned', "
     r"'auto'\]"),
    (dict(experimental=dict(fisher_share=0)), r'fisher_share=0 must be an int >= 1'),
    (dict(experimental=dict(local_draw='level')), r"local_draw='level' is unknown; allowed: "
                                                  r"\['batch', 'call'\]"),
    (dict(experimental=dict(global_weight=-1)), r'global_weight=-1 must be a number >= 0'),
    (dict(schedule=3), r'RegPTQ schedule=3 must be a ScheduleConfig or a dict'),
])
def test_bad_values_name_the_group_field_and_allowed_values(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        RegPTQ(**options)


def test_unknown_fields_list_the_allowed_ones():
    with pytest.raises(UnknownFieldError, match=r"RegPTQ fgic: unknown field\(s\) \['theta'\]; "
                                                r"allowed: \['lambda_', 'p', 'theta_c'"):
        RegPTQ(fgic=dict(theta=1))
    with pytest.raises(UnknownFieldError, match=r"RegPTQ schedule: unknown field\(s\) "
                                                r"\['fisher_share'\]; allowed: \['global_loss'"):
        RegPTQ(schedule=dict(fisher_share=2))   # an experimental option in the wrong group
    err = pytest.raises(KeyError, RegPTQ, llaq=dict(targets='reg')).value
    assert isinstance(err, ValueError) and str(err).startswith('RegPTQ llaq: unknown')


def test_build_method_validates_options_without_a_model():
    method = build_method(dict(type='RegPTQ', llaq=dict(target='head'),
                               schedule=dict(global_interval=4), iters=10))
    assert isinstance(method, RegPTQ) and method.llaq.target == 'head'
    assert method.tail_interval == 4 and method.iters == 10
    assert build_method(method) is method
    with pytest.raises(UnknownFieldError, match=r"method: unknown option\(s\) \['theta'\] for "
                                                r"RegPTQ; allowed: \[.*'fgic', 'llaq', "
                                                r"'schedule', 'experimental'.*'iters'"):
        build_method(dict(type='RegPTQ', theta=1))
    with pytest.raises(UnknownFieldError, match=r"\['drop_pro'\] for QDrop; allowed: .*"
                                                r"'drop_prob'"):
        build_method(dict(type='QDrop', drop_pro=0.5))
    with pytest.raises(ValueError, match=r"iters='10' must be an int >= 0"):
        build_method(dict(type='QDrop', iters='10'))
    with pytest.raises(KeyError, match=r"method\.type='RegPTQ2' is unknown; allowed: "
                                       r"\[.*'RegPTQ'"):
        build_method(dict(type='RegPTQ2'))
    with pytest.raises(ValueError, match=r'RegPTQ experimental: fisher_share=0'):
        build_method(dict(type='RegPTQ', experimental=dict(fisher_share=0)))
    with pytest.raises(RenamedOptionError, match=r'global_interval= -> schedule='):
        build_method(dict(type='RegPTQ', global_interval=1))
    assert build_method(dict(type='RegPTQ', schedule=dict(global_interval=1))).tail_interval == 1
    assert 'lr_llaq' not in RegPTQ.options() and RegPTQ.legacy_options['lr_llaq'] == 'llaq.lr'
    with pytest.raises(KeyError, match=r"\['global_intervall'\] for RegPTQ; allowed: .*; did "
                                       r"you mean 'global_interval' \(schedule\.global_interval\)"):
        build_method(dict(type='RegPTQ', global_intervall=4))
    with pytest.raises(KeyError, match=r"did you mean 'drop_prob'\?"):
        build_method(dict(type='QDrop', drop_prb=0.5))


def test_engine_interface_defaults_do_nothing():
    model = make_quant(make_float())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = QDrop()
    assert type(method).set_layer_defaults is PTQMethod.set_layer_defaults
    method.set_layer_defaults(head=['head.*'], regression=['head.cls'])
    method.prepare_model(model)
    assert method.global_loss_config() is None
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                 for k in before)


def test_reg_ptq_engine_interface():
    method = RegPTQ(llaq=dict(target='head', reg_layers=['x']))
    assert method.global_loss_config() is method.fgic
    method.set_layer_defaults(head=[r'head\..*'], regression=['head.cls'])
    assert (method.llaq.head_layers, method.llaq.reg_layers) == ([r'head\..*'], ['x'])
    model = make_quant(make_float())
    method.prepare_model(model)
    got = [n for n, m in iter_quant_modules(model) if isinstance(m.weight_quantizer,
                                                                  LLAQuantizer)]
    assert got == ['head.conv', 'head.cls']
    local = RegPTQ(schedule=dict(global_loss=False, fisher=False))
    assert local.global_loss_config() is None   # no L_G, no Fisher weights: nothing to build
    fisher_only = RegPTQ(schedule=dict(global_loss=False))
    assert fisher_only.global_loss_config() == FGICConfig()
    with pytest.raises(ValueError, match=r"llaq\.target='reg' needs llaq\.reg_layers"):
        RegPTQ().llaq_patterns()


@pytest.mark.parametrize('w_bits', [2, 4])
def test_dicts_and_built_groups_calibrate_identically(w_bits):
    """Non-default values in every group: the same state, bit for bit."""
    float_model, batches = make_float(), make_batches(2)
    built = dict(llaq=LLAQConfig(target='reg', reg_layers=['head.cls'], lr=2e-3,
                                 quantizer=dict(k_candidates=(1.0, 2.0))),
                 schedule=ScheduleConfig(global_interval=3, init_p=2.0),
                 experimental=ExperimentalConfig(fisher_share=2, local_draw='call',
                                                 global_weight=0.5))
    grouped = dict(llaq=dict(target='reg', reg_layers=['head.cls'], lr=2e-3,
                             quantizer=dict(k_candidates=(1.0, 2.0))),
                   schedule=dict(global_interval=3, init_p=2.0),
                   experimental=dict(fisher_share=2, local_draw='call', global_weight=0.5))
    states = []
    for options in (built, grouped):
        model = make_quant(float_model, w_bits, 4)
        torch.manual_seed(0)
        RegPTQ(iters=6, progress=False, log_interval=0, **options).calibrate(
            model, batches, forward_fn, global_loss=output_mse)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

