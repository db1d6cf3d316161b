"""Objectives: IsoMax+ against the authors' softmax-then-log definition, the objectives table."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from lightning_ood.nn.heads import IsoMaxPlusHead
from lightning_ood.nn.heads import L2NormalizedHead, LinearHead
from lightning_ood.nn.objectives import OBJECTIVES, cross_entropy_loss, isomax_plus_loss, native_score, objective
from tests.nn.test_heads import reference_isomax_plus_logits


def reference_isomax_plus_loss(logits, targets, entropic_scale=10.0):
    """The authors' loss: softmax of the entropic-scaled logits, then log, then NLL."""
    probabilities = torch.softmax(entropic_scale * logits, dim=1)
    log_probabilities = torch.log(probabilities)
    return -log_probabilities[torch.arange(len(targets)), targets].mean()


def test_isomax_plus_loss_signature():
    params = list(inspect.signature(isomax_plus_loss).parameters.values())
    assert [p.name for p in params] == ["logits", "targets", "entropic_scale"]
    assert params[2].default == 10.0


@pytest.mark.parametrize("entropic_scale", [1.0, 10.0])
def test_isomax_plus_loss_matches_reference(entropic_scale):
    torch.manual_seed(0)
    logits = -2 * torch.rand(16, 7)  # IsoMax+ logits are negative distances in [-2|d|, 0]
    targets = torch.randint(0, 7, (16,))
    loss = isomax_plus_loss(logits, targets, entropic_scale)
    expected = reference_isomax_plus_loss(logits, targets, entropic_scale)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


def test_isomax_plus_default_entropic_scale_is_ten():
    torch.manual_seed(1)
    logits = -torch.rand(4, 3)
    targets = torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(isomax_plus_loss(logits, targets), F.cross_entropy(10 * logits, targets))
    assert not torch.allclose(isomax_plus_loss(logits, targets), F.cross_entropy(logits, targets))


def test_isomax_plus_end_to_end_gradients_match_reference():
    """Loss and gradients w.r.t. the features, the prototypes and the distance scale equal
    those of the hand-written reference (head + loss) to 1e-6 in float32."""
    torch.manual_seed(0)
    head = IsoMaxPlusHead(32, 10)
    with torch.no_grad():
        head.distance_scale.fill_(-1.3)  # negative on purpose: abs() must be differentiated too
    features = torch.randn(12, 32, requires_grad=True)
    targets = torch.randint(0, 10, (12,))

    loss = isomax_plus_loss(head(features), targets, 10.0)
    grads = torch.autograd.grad(loss, (features, head.prototypes, head.distance_scale))

    features_ref = features.detach().clone().requires_grad_(True)
    prototypes_ref = head.prototypes.detach().clone().requires_grad_(True)
    scale_ref = head.distance_scale.detach().clone().requires_grad_(True)
    loss_ref = reference_isomax_plus_loss(
        reference_isomax_plus_logits(features_ref, prototypes_ref, scale_ref), targets, 10.0
    )
    grads_ref = torch.autograd.grad(loss_ref, (features_ref, prototypes_ref, scale_ref))

    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    for name, grad, grad_ref in zip(("features", "prototypes", "distance_scale"), grads, grads_ref):
        assert grad.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=0, msg=f"gradient w.r.t. {name}")
    # through abs(): flipping the sign of d flips the sign of dL/dd and changes nothing else
    with torch.no_grad():
        head.distance_scale.fill_(1.3)
    loss_pos = isomax_plus_loss(head(features), targets, 10.0)
    grad_pos = torch.autograd.grad(loss_pos, head.distance_scale)[0]
    torch.testing.assert_close(loss_pos, loss, atol=0, rtol=0)
    torch.testing.assert_close(grad_pos, -grads[2], atol=1e-7, rtol=0)


def test_objectives_table():
    assert tuple(OBJECTIVES) == ("ce", "isomax_plus", "l2_norm")
    assert objective("isomax_plus").loss is isomax_plus_loss
    assert objective("ce").loss is cross_entropy_loss and objective("l2_norm").loss is cross_entropy_loss
    logits, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    # the entropic scale is IsoMax+'s alone: cross-entropy ignores it
    torch.testing.assert_close(cross_entropy_loss(logits, targets, 10.0), F.cross_entropy(logits, targets))
    torch.testing.assert_close(isomax_plus_loss(logits, targets, 10.0), F.cross_entropy(10.0 * logits, targets))
    assert type(objective("ce").head(8, 3, 1.0)) is LinearHead
    assert type(objective("isomax_plus").head(8, 3, 1.0)) is IsoMaxPlusHead
    l2 = objective("l2_norm").head(8, 3, 0.5)
    assert type(l2) is L2NormalizedHead and l2.temperature == 0.5
    assert (native_score("ce"), native_score("isomax_plus"), native_score("l2_norm")) == (
        None, "min_distance", "penultimate_norm")
    with pytest.raises(ValueError, match="valid choices: ce, isomax_plus, l2_norm"):
        objective("focal")
