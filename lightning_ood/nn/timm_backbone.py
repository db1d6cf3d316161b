"""A timm model as the backbone of :class:`~lightning_ood.nn.classifier.Classifier`
(``--model.backbone timm:<name>``): timm is an optional dependency (``pip install
lightning_ood[timm]``).

The model is built with ``num_classes=0`` (timm then returns pooled features), its blocks
are found by the same rule as for any network (:func:`lightning_ood.nn.taps.resolve_blocks`,
``auto``), and FeatureNorm reads them through the same hooks as the project's ResNets.
"""
from __future__ import annotations

from torch import Tensor, nn

from lightning_ood.nn.taps import resolve_blocks

PREFIX = "timm:"


class TimmBackbone(nn.Module):
    """Pooled features (B, D) of a timm model, with its residual blocks.

    Args:
        name: a timm model name (``resnet18``, ``convnext_tiny`` ...). The weights are
            random: load a file with ``--model.pretrained`` (a state_dict of this timm model).

    Attributes:
        num_features: width D of the pooled features.
        num_blocks: number of blocks found (``auto`` rule); 0 disables FeatureNorm.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as err:
            raise ImportError(f"--model.backbone {PREFIX}{name} needs timm: pip install 'lightning_ood[timm]' "
                              f"(or pip install timm); {err}") from err
        try:
            self.net = timm.create_model(name, pretrained=False, num_classes=0)
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise ValueError(f"--model.backbone {PREFIX}{name}: {err}; list names with timm.list_models()") from err
        self.name = name
        self.num_features: int = int(self.net.num_features)
        self._block_names = resolve_blocks(self.net, "auto")
        self.num_blocks: int = len(self._block_names)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """The blocks in forward order, named as in the timm model's ``named_modules()``."""
        modules = dict(self.net.named_modules())
        return [(name, modules[name]) for name in self._block_names]

    def blocks(self) -> list[nn.Module]:
        return [block for _, block in self.named_blocks()]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
