"""Taps: pooled features from the head's input and block FeatureNorms from forward hooks,
on any network (no wrapper code)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_ood.detectors.functional import feature_norm
from lightning_ood.nn.taps import KNOWN_BLOCK_CLASSES, Taps, resolve_blocks


class _PadShortcut(nn.Module):
    """akamaster's option-A shortcut: subsample and zero-pad the channels."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """akamaster's CIFAR BasicBlock (github.com/akamaster/pytorch_resnet_cifar10)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyCifarResNet(nn.Module):
    """akamaster-style CIFAR ResNet, 3 stages x ``depth`` blocks: it pools with
    ``F.avg_pool2d`` in ``forward`` (no pooling module) and its head is ``linear``."""

    def __init__(self, num_classes: int = 3, width: int = 16, depth: int = 1) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, depth, 1)
        self.layer2 = self._make_layer(2 * width, depth, 2)
        self.layer3 = self._make_layer(4 * width, depth, 2)
        self.linear = nn.Linear(4 * width, num_classes)

    def _make_layer(self, planes, depth, stride):
        layers = []
        for s in [stride] + [1] * (depth - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


def _hand_hooks(modules):
    """Hand-written hooks: each module's output (float64), in call order."""
    maps = []
    handles = [m.register_forward_hook(lambda mod, args, z: maps.append(z.detach().double())) for m in modules]
    return maps, handles


def _hand_feature_norm(z):
    return z.clamp(min=0).pow(2).sum(dim=(2, 3)).sqrt().mean(dim=1)


def _no_hooks(network):
    return not any(m._forward_hooks or m._forward_pre_hooks for m in network.modules())


def test_auto_blocks_of_a_functional_pooling_network_and_features_from_the_head_input():
    torch.manual_seed(0)
    net = TinyCifarResNet(depth=2).eval()
    assert resolve_blocks(net) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    taps = Taps.on(net, head="linear")
    x = torch.randn(3, 3, 16, 16)
    inputs = []
    net.linear.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    maps, handles = _hand_hooks([net.get_submodule(n) for n in taps.block_names])
    with torch.no_grad():
        with taps.capture(blocks=True) as captured:
            logits = net(x)
    for handle in handles:
        handle.remove()
    features, norms = taps.features(captured), taps.block_norms(captured)
    assert torch.equal(features, inputs[0]) and features.shape == (3, 64)
    torch.testing.assert_close(net.linear(features), logits)
    assert norms.shape == (3, 6)
    torch.testing.assert_close(norms.double(), torch.stack([_hand_feature_norm(z) for z in maps], 1))
    net.linear._forward_pre_hooks.clear()
    assert _no_hooks(net)  # the taps' hooks live for one pass only


def test_block_specs_names_globs_class_names_and_lists():
    net = TinyCifarResNet(depth=2)
    every = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    assert resolve_blocks(net, "auto") == every
    assert resolve_blocks(net, "layer*.*") == every  # layer1.0.conv1 is inside layer1.0: outermost only
    assert resolve_blocks(net, "layer3.*") == ["layer3.0", "layer3.1"]
    assert resolve_blocks(net, "BasicBlock") == every
    assert resolve_blocks(net, "tests.nn.test_taps.BasicBlock") == every
    assert resolve_blocks(net, ["layer3.1", "layer1.0", "layer3.1"]) == ["layer3.1", "layer1.0"]  # list order, no repeats
    assert resolve_blocks(net, ["layer1.*", "layer3.1"]) == ["layer1.0", "layer1.1", "layer3.1"]
    assert resolve_blocks(net, "layer2") == ["layer2"]  # a name is taken as it is
    assert resolve_blocks(net, "none") == resolve_blocks(net, None) == resolve_blocks(net, []) == []
    assert resolve_blocks(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) == []  # auto finds none: no error


def test_auto_keeps_the_outermost_block_in_forward_order():
    class Outer(nn.Module):  # a "Bottleneck" that contains a BasicBlock
        def __init__(self):
            super().__init__()
            self.inner = BasicBlock(4, 4)

        def forward(self, x):
            return self.inner(x)

    Outer.__name__ = "Bottleneck"
    net = nn.Sequential(BasicBlock(3, 4), Outer(), BasicBlock(4, 4))
    assert resolve_blocks(net) == ["0", "1", "2"]
    assert resolve_blocks(net, "BasicBlock") == ["0", "1.inner", "2"]
    assert "Bottleneck" in KNOWN_BLOCK_CLASSES and "ConvNeXtBlock" in KNOWN_BLOCK_CLASSES


@pytest.mark.parametrize("spec, match", [
    ("layer9.*", r"the pattern 'layer9\.\*' matches no module name"),
    ("ResidualUnit", r"'ResidualUnit' is neither a module name nor a module class"),
    (["layer1.0", "stage2"], r"'stage2' is neither"),
])
def test_a_spec_that_matches_nothing_lists_the_modules(spec, match):
    with pytest.raises(ValueError, match=match) as err:
        resolve_blocks(TinyCifarResNet(), spec)
    for listed in ("'layer1'", "'layer1.0'", "'linear'", "'BasicBlock'"):
        assert listed in str(err.value)


def test_torchvision_resnets_auto_blocks():
    names18 = resolve_blocks(torchvision.models.resnet18())
    assert names18 == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    net50 = torchvision.models.resnet50()
    names50 = resolve_blocks(net50)
    assert len(names50) == 16 and all(type(net50.get_submodule(n)).__name__ == "Bottleneck" for n in names50)
    assert names50[:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]


def test_penultimate_override_reads_the_flattened_output():
    torch.manual_seed(0)
    net = TinyCifarResNet().eval()
    taps = Taps.on(net, head="linear", penultimate="layer3", blocks="none")
    assert taps.num_blocks == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), taps.capture(blocks=True) as captured:
        net(x)
    assert taps.features(captured).shape == (2, 64 * 8 * 8)
    assert taps.block_norms(captured) is None


def test_block_errors_name_the_block_and_hooks_are_removed():
    net = TinyCifarResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    flat = Taps.on(net, head="linear", blocks=["layer1.0", "linear"])
    with pytest.raises(ValueError, match=r"block 'linear' \(Linear\) gives \(2, 3\), not a \(B, C, H, W\) feature map"):
        with torch.no_grad(), flat.capture() as captured:
            net(x)
    assert _no_hooks(net)
    net.unused = BasicBlock(16, 16)  # a block the forward pass never calls
    taps = Taps.on(net, head="linear")
    with torch.no_grad(), taps.capture() as captured:
        net(x)
    with pytest.raises(ValueError, match=r"each block must run once per forward pass: 'unused' ran 0 times"):
        taps.block_norms(captured)
    idle = Taps.on(net, head="unused")
    with torch.no_grad(), idle.capture() as captured:
        net(x)
    with pytest.raises(ValueError, match=r"the head module 'unused' \(BasicBlock\) did not run"):
        idle.features(captured)
    with pytest.raises(ValueError, match=r"has no head module 'fc'.*'linear'"):
        Taps.on(net, head="fc")


class _WithTaps(nn.Module):
    def __init__(self, network, taps):
        super().__init__()
        self.network, self.taps = network, taps

    def forward(self, x):
        with self.taps.capture(blocks=True) as captured:
            logits = self.network(x)
        return logits, self.taps.features(captured), self.taps.block_norms(captured)


@pytest.mark.parametrize("make, head", [(TinyCifarResNet, "linear"),
                                        (lambda: torchvision.models.resnet18(num_classes=3), "fc")])
def test_torch_export_of_a_network_with_taps(make, head):
    """Captured tensors live in a plain container: no 'attribute assigned during export'
    warning, and the program equals the eager pass with a batch size it never saw."""
    torch.manual_seed(0)
    net = make().eval()
    module = _WithTaps(net, Taps.on(net, head=head)).eval()
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(module, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},), strict=False)
    assert not [w for w in caught if "during export" in str(w.message)], [str(w.message) for w in caught]
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        got, expected = program.module()(x), module(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert _no_hooks(net)


def test_classifier_block_norms_come_from_the_same_taps():
    from lightning_ood.nn.classifier import Classifier

    torch.manual_seed(0)
    model = Classifier(width=8, num_classes=4).eval()
    assert model.block_names == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)] and model.num_blocks == 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_outputs(x, with_block_norms=True)
        maps, handles = _hand_hooks(model.backbone.blocks())
        model.backbone(x)
    for handle in handles:
        handle.remove()
    # exactly FeatureNorm of each block output (the same function, the same tensor)
    assert torch.equal(out.block_norms, torch.stack([feature_norm(z.float()) for z in maps], 1))
    assert _no_hooks(model)
    model.check_forward(x)
    with pytest.raises(ValueError, match=r"the network fails on a test batch of shape \(2, 1, 32, 32\)"):
        model.check_forward(x[:, :1])


@pytest.mark.parametrize("name, head, expected", [("resnet18", "fc", 8), ("convnext_atto", "head.fc", 12)])
def test_timm_auto_blocks(name, head, expected):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=3).eval()
    taps = Taps.on(net, head=head)
    block = "BasicBlock" if name == "resnet18" else "ConvNeXtBlock"
    assert taps.num_blocks == expected and all(type(m).__name__ == block for _, m in taps.blocks)
    x = torch.randn(2, 3, 32, 32)
    maps, handles = _hand_hooks([m for _, m in taps.blocks])
    with torch.no_grad(), taps.capture() as captured:
        logits = net(x)
    for handle in handles:
        handle.remove()
    assert logits.shape == (2, 3) and taps.features(captured).shape == (2, net.num_features)
    torch.testing.assert_close(taps.block_norms(captured).double(), torch.stack([_hand_feature_norm(z) for z in maps], 1))
