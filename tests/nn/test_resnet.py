"""Backbones: per-block outputs, widths, and loading torchvision ResNet weight files."""
import pytest
import torch
import torchvision
from torch import nn

from lightning_ood.nn.taps import Taps
from lightning_ood.nn.resnet import BACKBONES, ResNetBackbone, build_backbone, split_torchvision_state_dict
from lightning_ood.lightning.module import OODClassifier


def _block_outputs(net, x):
    """Pooled features and every block's output, read through the taps (identity reduce)."""
    taps = Taps(blocks=net.named_blocks(), reduce=lambda t: t)
    with taps.capture() as captured:
        pooled = net(x)
    return pooled, captured.block_values


def test_resnet18_cifar_stem_block_outputs():
    torch.manual_seed(0)
    net = build_backbone("resnet18").eval()
    assert net.cifar_stem and net.num_blocks == 8 and net.num_features == 512
    with torch.no_grad():
        pooled, blocks = _block_outputs(net, torch.randn(2, 3, 32, 32))
    expected = [(64, 32), (64, 32), (128, 16), (128, 16), (256, 8), (256, 8), (512, 4), (512, 4)]
    assert [tuple(b.shape) for b in blocks] == [(2, c, s, s) for c, s in expected]
    assert pooled.shape == (2, 512)
    # the pooled features are the spatial mean of the last block's output
    torch.testing.assert_close(pooled, blocks[-1].mean(dim=(2, 3)))
    assert [name for name, _ in net.named_blocks()] == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    assert [b for _, b in net.named_blocks()] == net.blocks()


def test_resnet50_imagenet_stem_block_outputs():
    torch.manual_seed(0)
    net = build_backbone("resnet50").eval()
    assert not net.cifar_stem and net.num_blocks == 16 and net.num_features == 2048
    with torch.no_grad():
        pooled, blocks = _block_outputs(net, torch.randn(1, 3, 64, 64))
    expected = [(256, 16)] * 3 + [(512, 8)] * 4 + [(1024, 4)] * 6 + [(2048, 2)] * 3
    assert [tuple(b.shape) for b in blocks] == [(1, c, s, s) for c, s in expected]
    assert pooled.shape == (1, 2048)
    torch.testing.assert_close(pooled, blocks[-1].mean(dim=(2, 3)))


def test_block_taps_reduce_each_block_and_leave_no_hooks():
    torch.manual_seed(0)
    net = build_backbone("resnet18", width=8).eval()
    x = torch.randn(3, 3, 32, 32)
    sums = Taps(blocks=net.named_blocks(), reduce=lambda t: t.sum(dim=(1, 2, 3)))
    with torch.no_grad():
        pooled = net(x)
        with sums.capture() as captured:
            pooled2 = net(x)
        _, full = _block_outputs(net, x)
    torch.testing.assert_close(pooled, pooled2)
    norms = sums.block_norms(captured)
    assert norms.shape == (3, 8)
    torch.testing.assert_close(norms, torch.stack([b.sum(dim=(1, 2, 3)) for b in full], dim=1))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize("arch, expansion", [("resnet18", 1), ("resnet50", 4)])
def test_width_scales_every_stage(arch, expansion):
    net = ResNetBackbone(arch, cifar_stem=True, width=8)
    assert net.num_features == 8 * 8 * expansion
    assert net.conv1.out_channels == 8 and net.conv1.kernel_size == (3, 3)
    assert isinstance(net.maxpool, nn.Identity)
    with torch.no_grad():
        pooled = net.eval()(torch.randn(2, 3, 32, 32))
    assert pooled.shape == (2, 8 * 8 * expansion)


def test_stem_override_and_validation():
    assert build_backbone("resnet18", cifar_stem=False).conv1.kernel_size == (7, 7)
    assert build_backbone("resnet50", cifar_stem=True, width=8).conv1.kernel_size == (3, 3)
    assert BACKBONES == ("resnet18", "resnet50")
    with pytest.raises(ValueError, match="valid choices: resnet18, resnet50"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="width must be >= 1"):
        ResNetBackbone("resnet18", width=0)


def test_split_torchvision_state_dict():
    state = torchvision.models.resnet18().state_dict()
    backbone, head = split_torchvision_state_dict(state)
    assert set(head) == {"weight", "bias"} and head["weight"].shape == (1000, 512)
    assert not any(k.startswith("fc.") for k in backbone)
    assert len(backbone) + 2 == len(state)


@pytest.mark.parametrize("arch, loss", [("resnet18", "ce"), ("resnet50", "l2_norm")])
def test_torchvision_weights_give_torchvision_outputs(tmp_path, arch, loss):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)()
    # non-trivial BatchNorm statistics so that loading them is tested too
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    reference.eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)

    model = OODClassifier(backbone=arch, loss=loss, num_classes=1000, cifar_stem=False, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(model.head.weight, reference.fc.weight)


def test_torchvision_weights_nested_under_state_dict_key_and_other_class_count(tmp_path):
    """A {"state_dict": ...} file loads too; with another class count only the backbone loads."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    model = OODClassifier(backbone="resnet18", num_classes=10, cifar_stem=False, pretrained=str(path)).eval()
    reference.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), reference(x), atol=1e-5, rtol=1e-5)
    assert model.head.weight.shape == (10, 512)


def test_non_resnet_weights_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "mlp.pth"
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit backbone 'resnet18'.*missing .*unexpected"):
        OODClassifier(backbone="resnet18", num_classes=10, pretrained=str(path))


@pytest.mark.parametrize("arch, cifar_stem", [("resnet50", False), ("resnet18", True)])
def test_wrong_architecture_file_gives_a_clear_error(tmp_path, arch, cifar_stem):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=rf"does not fit backbone '{arch}'"):
        OODClassifier(backbone=arch, cifar_stem=cifar_stem, num_classes=1000, pretrained=str(path))


def test_unreadable_or_missing_weights_file(tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        OODClassifier(num_classes=10, width=8, pretrained=str(bad))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        OODClassifier(num_classes=10, width=8, pretrained=str(tmp_path / "absent.pth"))
