"""quantize_model coverage, report, helpers, activation initialisation."""
import pytest
import torch
from torch import nn

from mmdet_regptq.quant import (ActivationObserver, QuantConv2d, QuantLinear, QuantModule,
                                QuantMultiheadAttention, QuantPolicy, init_activation_quantizers,
                                iter_quant_modules, quantize_model, restore_float, set_drop_prob,
                                set_quant_state)


class TinyDet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.neck = nn.ModuleDict(dict(lateral=nn.Conv2d(8, 8, 1), fc=nn.Linear(8, 8)))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.ModuleDict(dict(cls=nn.Conv2d(8, 3, 1), reg=nn.Conv2d(8, 4, 1)))
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        x = self.neck['lateral'](self.stem(x))
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)                       # [N, HW, C]
        tokens = self.neck['fc'](tokens + self.attn(tokens, tokens, tokens)[0])
        x = tokens.transpose(1, 2).reshape(n, c, h, w)
        return self.head['cls'](x), self.head['reg'](x)


@pytest.fixture
def det():
    torch.manual_seed(0)
    model = TinyDet().eval()
    bn = model.stem[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    return model, x


def _forward(x):
    return lambda m: m(x)


def test_quantize_model_coverage_and_report(det):
    model, x = det
    policy = QuantPolicy(w_bits=4, a_bits=4, fp_layers=[r'head\.reg'],
                         overrides={r'neck\.fc': {'w_bits': 2, 'a_bits': 8}})
    report = quantize_model(model, policy, _forward(x))
    assert isinstance(model.stem[0], QuantConv2d)
    assert isinstance(model.neck['lateral'], QuantConv2d)
    assert isinstance(model.neck['fc'], QuantLinear)
    assert isinstance(model.attn, QuantMultiheadAttention)
    assert type(model.attn.module.out_proj) is not QuantLinear   # not double-wrapped
    assert isinstance(model.head['cls'], QuantConv2d)
    assert isinstance(model.head['reg'], nn.Conv2d)              # fp_layers
    assert isinstance(model.unused, QuantLinear)                 # wrapped even if not run
    assert isinstance(model.stem[1], nn.Identity)                # BN folded
    assert report.folded_bn == [('stem.0', 'stem.1')]
    assert report.first_layer == 'stem.0'
    assert (model.stem[0].w_bits, model.stem[0].a_bits) == (8, 8)
    assert (model.neck['fc'].w_bits, model.neck['fc'].a_bits) == (2, 8)
    assert (model.head['cls'].w_bits, model.head['cls'].a_bits) == (4, 4)
    assert report.num_eligible == 7 and report.num_quantized == 6
    names = {row.name for row in report.layers}
    assert names == {'stem.0', 'neck.lateral', 'neck.fc', 'attn', 'head.cls', 'head.reg',
                     'unused'}
    table = report.table()
    for name in names:
        assert name in table
    assert 'quantized 6 / 7' in table and 'fp_layers' in table
    lines = table.splitlines()
    assert lines[2].index('Conv2d') == lines[0].index('type')      # aligned columns
    assert set(lines[1]) == {'-', ' '}
    for _, module in iter_quant_modules(model):
        for q in module.weight_quantizers().values():
            assert q.is_initialized() and q.name.startswith(_ + '.')
        for q in module.input_quantizers().values():
            assert not q.is_initialized()
    with pytest.raises(RuntimeError, match='stem.0.input_quantizer'):
        model(x)


def test_activation_init_and_quantized_forward(det):
    model, x = det
    with torch.no_grad():
        ref = model(x)
    quantize_model(model, QuantPolicy(w_bits=8, a_bits=8), _forward(x))
    names = init_activation_quantizers(model, lambda: model(x), max_elements=1000)
    assert 'stem.0.input_quantizer' in names and 'attn.value_quantizer' in names
    assert not model.unused.input_quantizer.is_initialized()     # never executed
    assert model.unused.input_quantizer.name not in names
    with torch.no_grad():
        out = model(x)
    for o, r in zip(out, ref):
        assert torch.allclose(o, r, atol=0.1 * r.abs().max().item())
    set_quant_state(model, weight=False, input=False)
    with torch.no_grad():
        for o, r in zip(model(x), ref):
            assert torch.allclose(o, r, atol=1e-5)
    set_drop_prob(model, 0.5)
    assert all(m.drop_prob == 0.5 for _, m in iter_quant_modules(model))
    restored = restore_float(model)
    assert 'attn' in restored and not list(iter_quant_modules(model))
    assert isinstance(model.attn, nn.MultiheadAttention)


def test_first_layer_and_final_layers_options(det):
    model, x = det
    policy = QuantPolicy(first_layer='neck.lateral', final_layers=[r'head\..*'], fold_bn=False)
    report = quantize_model(model, policy)
    assert report.first_layer == 'neck.lateral' and model.neck['lateral'].w_bits == 8
    assert model.stem[0].w_bits == 4 and not report.folded_bn
    assert isinstance(model.head['cls'], nn.Conv2d) and isinstance(model.head['reg'], nn.Conv2d)


def test_errors(det):
    model, x = det
    with pytest.raises(ValueError, match='no Conv2d/Linear/MultiheadAttention to quantize in '
                                         'Sequential'):
        quantize_model(nn.Sequential(nn.ReLU()), QuantPolicy())
    with pytest.raises(ValueError, match="first_layer='auto'"):
        quantize_model(model, QuantPolicy(fold_bn=False))
    with pytest.raises(ValueError, match='fold_bn'):
        quantize_model(model, QuantPolicy())
    with pytest.raises(ValueError, match='first_layer'):
        quantize_model(model, QuantPolicy(first_layer='nope', fold_bn=False))
    with pytest.raises(ValueError, match='w_bits'):
        quantize_model(model, dict(w_bits=12))
    quantize_model(model, dict(first_layer=None, fold_bn=False))
    with pytest.raises(ValueError, match='already quantized'):
        quantize_model(model, dict(first_layer=None, fold_bn=False))


def test_shared_module_and_custom_forward():
    class WSConv(nn.Conv2d):                       # weight standardisation: custom forward
        def forward(self, x):
            w = self.weight - self.weight.mean()
            return self._conv_forward(x, w, self.bias)

    conv = nn.Conv2d(3, 3, 1)
    model = nn.Module()
    model.a = conv
    model.b = conv                                 # the same module under two names
    model.ws = WSConv(3, 3, 1)
    report = quantize_model(model, dict(first_layer=None, fold_bn=False))
    assert isinstance(model.a, QuantConv2d) and model.a is model.b
    assert isinstance(model.ws, WSConv)
    assert [r.note for r in report.layers if r.name == 'ws'] == ['custom forward']


def test_activation_observer_bounded_and_deterministic():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 4, 10, 10, generator=gen) for _ in range(10)]
    samples = []
    for _ in range(2):
        obs = ActivationObserver(max_elements=300)
        for b in batches:
            obs.update(b)
        samples.append(obs.sample())
    assert torch.equal(samples[0], samples[1])
    assert samples[0].numel() <= 302
    everything = torch.cat([b.flatten() for b in batches])
    assert samples[0].max() == everything.max() and samples[0].min() == everything.min()
    per_channel = ActivationObserver(per_channel=True, ch_axis=1, max_elements=400)
    for b in batches:
        per_channel.update(b)
    sample = per_channel.sample()
    assert sample.dim() == 4 and sample.shape[1] == 4 and sample.numel() <= 408
    from mmdet_regptq.quant import UniformQuantizer
    q = UniformQuantizer(4, per_channel=True, ch_axis=1)
    q.init_from(sample)
    assert q.scale.shape == (1, 4, 1, 1)
    assert q(batches[0]).shape == batches[0].shape


def test_quant_module_base_is_public():
    assert issubclass(QuantConv2d, QuantModule)


def test_state_dict_round_trip_and_deepcopy(det):
    import copy
    model, x = det
    policy = QuantPolicy(w_bits=4, a_bits=4)
    quantize_model(model, policy, _forward(x))
    init_activation_quantizers(model, lambda: model(x))
    with torch.no_grad():
        ref = model(x)
    torch.manual_seed(1)
    fresh = TinyDet().eval()                      # different float weights
    quantize_model(fresh, policy, _forward(x))
    fresh.load_state_dict(model.state_dict())
    assert fresh.stem[0].input_quantizer.is_initialized()
    with torch.no_grad():
        for o, r in zip(fresh(x), ref):
            assert torch.equal(o, r)
        for o, r in zip(copy.deepcopy(model)(x), ref):
            assert torch.equal(o, r)
