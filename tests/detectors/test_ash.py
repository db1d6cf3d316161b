import math

import pytest
import torch
from torch import nn

from lightning_ood.detectors.ash import ASH
from lightning_ood.detectors.base import ForwardOutputs
from lightning_ood.detectors.functional import ash_b, ash_p, ash_s
from lightning_ood.heads import IsoMaxPlusHead, LinearHead


def _outputs(head: nn.Module, features: torch.Tensor) -> ForwardOutputs:
    with torch.no_grad():
        return ForwardOutputs(logits=head(features), features=features)


def test_hand_example_through_identity_head():
    # Identity head: logits are the shaped features themselves.
    head = nn.Identity()
    detector = ASH("b", 50)
    detector.attach(head)
    out = ForwardOutputs(logits=torch.zeros(1, 4), features=torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert torch.equal(detector.shaped_logits(out), torch.tensor([[0.0, 0.0, 5.0, 5.0]]))
    expected = math.log(2 + 2 * math.exp(5.0))
    torch.testing.assert_close(detector(out), torch.tensor([expected]))


@pytest.mark.parametrize("variant, fn", [("p", ash_p), ("b", ash_b), ("s", ash_s)])
def test_through_linear_head(variant, fn):
    torch.manual_seed(0)
    head = LinearHead(32, 5)
    features = torch.relu(torch.randn(6, 32))
    out = _outputs(head, features)
    before = features.clone()
    detector = ASH(variant, 75)
    detector.attach(head)
    with torch.no_grad():
        logits = detector.shaped_logits(out)
        expected = head(fn(features, 75))
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(detector(out), torch.logsumexp(expected, dim=1))
    assert torch.equal(features, before)
    assert detector.name == f"ash_{variant}"


def test_through_isomax_plus_head():
    torch.manual_seed(0)
    head = IsoMaxPlusHead(32, 5)
    features = torch.relu(torch.randn(6, 32))
    detector = ASH("s", 90)
    detector.attach(head)
    with torch.no_grad():
        score = detector(_outputs(head, features))
        expected = torch.logsumexp(head(ash_s(features, 90)), dim=1)
    assert score.shape == (6,) and torch.isfinite(score).all()
    torch.testing.assert_close(score, expected)


def test_head_is_not_registered():
    head = LinearHead(8, 3)
    detector = ASH()
    detector.attach(head)
    assert list(detector.state_dict()) == ["fitted", "pruning_percentile"]
    assert list(detector.parameters()) == []
    assert list(detector.children()) == []


def test_defaults_flags_and_repr():
    detector = ASH()
    assert detector.variant == "s" and detector.percentile == 90.0
    assert detector.changes_logits and not detector.requires_fit
    assert detector.skip_reason(LinearHead(8, 3)) is None
    assert "percentile=90.0" in repr(detector)


def test_percentile_is_a_checkpointed_buffer():
    detector = ASH("s", 90)
    detector.percentile = 95
    assert detector.percentile == 95.0
    fresh = ASH("s", 90)
    fresh.load_state_dict(detector.state_dict(), strict=True)
    assert fresh.percentile == 95.0


def test_invalid_arguments():
    with pytest.raises(ValueError, match="variant"):
        ASH("x")
    with pytest.raises(ValueError, match="0-100 scale"):
        ASH("s", 150)
    detector = ASH()
    with pytest.raises(ValueError, match="0-100 scale"):
        detector.percentile = -0.5
    assert detector.percentile == 90.0


def test_score_before_attach_is_a_clear_error():
    out = ForwardOutputs(logits=torch.zeros(2, 3), features=torch.rand(2, 8))
    with pytest.raises(RuntimeError, match="attach"):
        ASH()(out)


def test_degenerate_features_stay_finite():
    head = LinearHead(16, 4)
    detector = ASH("s", 90)
    detector.attach(head)
    for features in (torch.zeros(3, 16), -torch.rand(3, 16), torch.randn(1, 16)):
        with torch.no_grad():
            score = detector(_outputs(head, features))
        assert torch.isfinite(score).all()


def test_nan_features_are_a_clear_error():
    head = LinearHead(16, 4)
    detector = ASH("s", 90)
    detector.attach(head)
    features = torch.rand(3, 16)
    features[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        detector(ForwardOutputs(logits=torch.zeros(3, 4), features=features))


def test_a_fraction_given_as_percentile_is_refused_unless_allowed():
    from lightning_ood.detectors import ASH

    with pytest.raises(ValueError, match=r"ASH percentile 0.9 is on the 0-100 scale, so it prunes only 0.9 % .*"
                                         r"did you mean 90\? Pass allow_small_percentile=True"):
        ASH("s", 0.9)
    assert ASH("s", 0.9, allow_small_percentile=True).percentile == pytest.approx(0.9)
    assert ASH("s", 0).percentile == 0 and ASH("s", 65).percentile == 65
