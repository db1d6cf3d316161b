"""Small builders shared by the detector tests."""
from __future__ import annotations

import torch
from torch import nn

from lightning_ood.detectors.base import ForwardOutputs
from lightning_ood.nn.heads import LinearHead


def linear_head(weight: list[list[float]], bias: list[float]) -> LinearHead:
    """A linear head with exactly these (C, D) weights and (C,) bias."""
    head = LinearHead(len(weight[0]), len(weight))
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
        head.bias.copy_(torch.tensor(bias))
    return head


def head_outputs(head: nn.Module, features: torch.Tensor) -> ForwardOutputs:
    """The bundle a forward pass would give for these pooled features: logits = head(features)."""
    with torch.no_grad():
        return ForwardOutputs(logits=head(features), features=features)


def clusters(n: int, seed: int, dim: int = 8, classes: int = 4, ood: bool = False) -> torch.Tensor:
    """ID: 3 e_c + noise for the first ``classes`` axes; OOD: 3 e_j on the other axes."""
    gen = torch.Generator().manual_seed(seed)
    axes = torch.randint(classes, dim, (n,), generator=gen) if ood else torch.randint(0, classes, (n,), generator=gen)
    return 3.0 * torch.eye(dim)[axes] + 0.3 * torch.randn(n, dim, generator=gen)


def axis_head(seed: int = 0) -> LinearHead:
    """4 classes reading the first 4 of 8 axes (plus small random parts)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.cat([torch.eye(4), torch.zeros(4, 4)], dim=1) + 0.05 * torch.randn(4, 8, generator=gen)
    return linear_head(weight.tolist(), (0.1 * torch.randn(4, generator=gen)).tolist())
