"""ResNet backbones: images -> pooled features; block outputs are read by hooks (``nn/taps.py``).

Built on torchvision's ResNet so parameter names match torchvision's ``state_dict``
(``conv1``, ``bn1``, ``layer1.0.conv1`` ...): a torchvision ResNet file loads into the
backbone, its ``fc.*`` entries into a linear head (see :func:`split_torchvision_state_dict`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet


class _ScaledResNet(tv_resnet.ResNet):
    """torchvision's ResNet with every stage's width scaled by ``width / 64``."""

    def __init__(self, block: type, layers: list[int], width: int) -> None:
        self._width = width
        super().__init__(block, layers)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(8 * width * block.expansion, 1000)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        if planes == 64:  # first stage: the stem's output width
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its ``fc`` layer.

    Args:
        arch: ``resnet18`` or ``resnet50``.
        cifar_stem: replace the ImageNet stem (7x7 stride-2 conv + max-pool) by a 3x3
            stride-1 conv without max-pool, the usual stem for 32x32 images.
        width: channels of the stem and first stage (64 = the standard ResNet; every stage
            scales with it). Smaller widths make CPU runs such as the quickstart fast.

    Attributes:
        num_features: width D of the pooled features.
        num_blocks: number of residual blocks (8 for ResNet18, 16 for ResNet50).
    """

    def __init__(self, arch: str = "resnet18", cifar_stem: bool = True, width: int = 64) -> None:
        super().__init__()
        layouts = {"resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]), "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3])}
        if arch not in layouts:
            raise ValueError(f"unknown backbone {arch!r}; valid choices: {', '.join(layouts)}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        block, layers = layouts[arch]
        net = tv_resnet.ResNet(block, layers) if width == 64 else _ScaledResNet(block, layers, width)
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.arch = arch
        self.cifar_stem = cifar_stem
        self.width = width
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool = net.avgpool
        self.num_features: int = net.fc.in_features
        self.num_blocks: int = len(self.blocks())

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """The residual blocks in forward order, with their names (``layer1.0`` ... as in
        torchvision's ``named_modules()``)."""
        return [(f"{stage}.{i}", block) for stage in ("layer1", "layer2", "layer3", "layer4")
                for i, block in enumerate(getattr(self, stage))]

    def blocks(self) -> list[nn.Module]:
        """The residual blocks in forward order."""
        return [block for _, block in self.named_blocks()]

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features (B, D).

        Block outputs are read with hooks (:class:`lightning_ood.nn.taps.Taps` on
        :meth:`named_blocks`), as for any other network.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def split_torchvision_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a torchvision ResNet ``state_dict`` into (backbone, head) parts.

    ``fc.weight``/``fc.bias`` become the head's ``weight``/``bias``.
    """
    backbone = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    head = {k[len("fc."):]: v for k, v in state_dict.items() if k.startswith("fc.")}
    return backbone, head


BACKBONES = ("resnet18", "resnet50")


def build_backbone(name: str, cifar_stem: bool | None = None, width: int = 64) -> ResNetBackbone:
    """Build a backbone by name. ``resnet18`` defaults to the CIFAR stem, ``resnet50`` to
    the ImageNet stem; ``cifar_stem`` overrides the default. ``width`` scales every stage
    (64 = standard)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid choices: {', '.join(BACKBONES)}")
    if cifar_stem is None:
        cifar_stem = name == "resnet18"
    return ResNetBackbone(name, cifar_stem=cifar_stem, width=width)
