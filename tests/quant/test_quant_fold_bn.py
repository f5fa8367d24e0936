"""BatchNorm folding by tensor identity."""
import torch
from torch import nn

from mmdet_regptq.quant import fold_bn


def _randomize_bn(model):
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=gen))
            m.bias.data.copy_(torch.randn(n, generator=gen))


class Block(nn.Module):
    """mmdet-style block: BN registered under a config-derived name, read via a property."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1_name = 'bn_a'
        self.add_module(self.norm1_name, nn.BatchNorm2d(cout))
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    @property
    def norm1(self):
        return getattr(self, self.norm1_name)

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.bn_after_relu = nn.BatchNorm2d(8)      # input modified in place: not foldable
        self.block = Block(8, 16, 2)
        self.tail = nn.Conv2d(16, 4, 1)
        self.bn_no_conv = nn.BatchNorm2d(4)         # preceded by an add: not foldable

    def forward(self, x):
        x = self.bn_after_relu(self.relu(self.stem(x)))
        x = self.tail(self.block(x))
        return self.bn_no_conv(x + 1)


def test_fold_bn_exact_and_replaces_modules():
    torch.manual_seed(0)
    model = Net().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    model.train()
    pairs = fold_bn(model, lambda m: m(x))
    assert model.training and model.block.training          # modes restored
    assert pairs == [('block.conv1', 'block.bn_a'), ('block.conv2', 'block.bn2'),
                     ('block.downsample.0', 'block.downsample.1')]
    assert isinstance(model.block.norm1, nn.Identity)        # via the registered name
    assert isinstance(model.block.bn2, nn.Identity)
    assert isinstance(model.block.downsample[1], nn.Identity)
    assert isinstance(model.bn_after_relu, nn.BatchNorm2d)
    assert isinstance(model.bn_no_conv, nn.BatchNorm2d)
    assert isinstance(model.block.conv1.bias, nn.Parameter)  # bias added
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_shared_conv_feeding_one_bn_per_call_is_folded_once():
    torch.manual_seed(0)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.other_bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.other_bn(self.conv(x * 2))

    model = Shared().eval()
    _randomize_bn(model)
    x = torch.randn(1, 3, 4, 4)
    ref = model(x)
    assert fold_bn(model, lambda m: m(x)) == []              # two BNs claim the same conv
    assert torch.equal(model(x), ref)
