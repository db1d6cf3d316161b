"""Classification heads: IsoMax+ distances, the train-only L2 normalisation, the factory."""
import pytest
import torch
from torch import nn

from lightning_ood.nn.heads import IsoMaxPlusHead, L2NormalizedHead, LinearHead


def reference_isomax_plus_logits(features, prototypes, distance_scale):
    """The authors' definition written out: normalise, explicit Euclidean distance
    (sqrt of summed squared differences), scaled by |d|, negated."""
    f = features / features.norm(dim=1, keepdim=True)
    p = prototypes / prototypes.norm(dim=1, keepdim=True)
    diff = f[:, None, :] - p[None, :, :]
    distances = torch.sqrt((diff * diff).sum(dim=2))
    return -torch.abs(distance_scale) * distances


def test_isomax_plus_initialisation():
    torch.manual_seed(0)
    head = IsoMaxPlusHead(512, 100)
    assert head.prototypes.shape == (100, 512)
    assert head.distance_scale.shape == (1,) and head.distance_scale.item() == 1.0
    # N(0, 1) prototypes
    assert abs(head.prototypes.mean().item()) < 0.02
    assert abs(head.prototypes.std().item() - 1.0) < 0.02
    assert {name for name, _ in head.named_parameters()} == {"prototypes", "distance_scale"}


def test_isomax_plus_logits_match_reference():
    torch.manual_seed(0)
    head = IsoMaxPlusHead(16, 5)
    with torch.no_grad():
        head.distance_scale.fill_(1.7)
    features = torch.randn(8, 16)
    logits = head(features)
    expected = reference_isomax_plus_logits(features, head.prototypes, head.distance_scale)
    assert logits.shape == (8, 5)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    # distances of unit vectors lie in [0, 2]; logits are their negatives times |d|
    assert (logits <= 0).all() and (logits >= -2 * 1.7 - 1e-5).all()


def test_isomax_plus_uses_absolute_distance_scale():
    torch.manual_seed(0)
    head = IsoMaxPlusHead(16, 5)
    features = torch.randn(4, 16)
    with torch.no_grad():
        head.distance_scale.fill_(2.5)
        positive = head(features)
        head.distance_scale.fill_(-2.5)
        negative = head(features)
    torch.testing.assert_close(negative, positive, atol=0, rtol=0)
    assert (negative <= 0).all()  # a negative d never turns distances into similarities
    expected = reference_isomax_plus_logits(features, head.prototypes, torch.tensor([-2.5]))
    torch.testing.assert_close(negative, expected, atol=1e-6, rtol=0)


def test_isomax_plus_zero_distance():
    """A feature equal (up to scale) to a prototype has distance 0: logit exactly 0, the maximum."""
    torch.manual_seed(0)
    head = IsoMaxPlusHead(8, 3)
    features = (3.0 * head.prototypes.detach()[1:2]).requires_grad_(True)
    logits = head(features)
    assert logits[0].argmax().item() == 1
    assert abs(logits[0, 1].item()) < 1e-6
    logits.sum().backward()  # the distance's gradient at 0 stays finite (no NaN from sqrt)
    assert torch.isfinite(features.grad).all() and torch.isfinite(head.prototypes.grad).all()


def test_isomax_plus_is_scale_invariant_in_features():
    torch.manual_seed(0)
    head = IsoMaxPlusHead(8, 3)
    features = torch.randn(4, 8)
    torch.testing.assert_close(head(features), head(10.0 * features), atol=1e-6, rtol=0)


def test_isomax_plus_distances_stay_float32_under_bf16_autocast():
    """Mixed precision hands the head bfloat16 features; the distances are computed in
    float32 from them (cdist has no bfloat16 CPU kernel), so logits equal the float32 head
    applied to the same bf16-rounded features."""
    torch.manual_seed(0)
    head = IsoMaxPlusHead(16, 5)
    features = torch.randn(4, 16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, head(features.float()), rtol=0, atol=0)


def test_isomax_plus_keeps_float64_and_runs_on_the_meta_device():
    torch.manual_seed(0)
    head = IsoMaxPlusHead(6, 3).double()
    features = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert head(features).dtype == torch.float64
    assert torch.autograd.gradcheck(head, (features,))
    meta_head = IsoMaxPlusHead(6, 3).to("meta")  # shape inference: no autocast on this device
    assert meta_head(torch.empty(4, 6, device="meta")).shape == (4, 3)


def test_l2_head_train_mode_normalises_and_divides_by_temperature():
    torch.manual_seed(0)
    head = L2NormalizedHead(6, 3, temperature=0.1).train()
    features = torch.randn(5, 6) * 7.0
    expected = (features / features.norm(dim=1, keepdim=True) / 0.1) @ head.weight.T + head.bias
    torch.testing.assert_close(head(features), expected, atol=1e-5, rtol=1e-6)
    # in training the logits do not depend on the feature's scale
    torch.testing.assert_close(head(features), head(3.0 * features), atol=1e-5, rtol=1e-6)


def test_l2_head_eval_mode_is_the_unnormalised_linear_layer():
    torch.manual_seed(0)
    head = L2NormalizedHead(6, 3, temperature=0.1).eval()
    features = torch.randn(5, 6) * 7.0
    expected = features @ head.weight.T + head.bias
    torch.testing.assert_close(head(features), expected, atol=1e-6, rtol=1e-6)
    # the eval path is not the training path
    head.train()
    assert not torch.allclose(head(features), expected, atol=1e-3)


def test_l2_head_default_temperature_is_the_paper():
    head = L2NormalizedHead(4, 2)
    assert head.temperature == 1.0
    features = torch.randn(3, 4)
    expected = (features / features.norm(dim=1, keepdim=True)) @ head.weight.T + head.bias
    torch.testing.assert_close(head.train()(features), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_l2_head_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L2NormalizedHead(4, 2, temperature=temperature)


def test_linear_head_is_a_linear_layer():
    head = LinearHead(4, 3)
    assert isinstance(head, nn.Linear) and head.weight.shape == (3, 4)
