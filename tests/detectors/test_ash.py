import math

import pytest
import torch
from torch import nn

from lightning_ood.detectors.ash import ASH
from lightning_ood.detectors.base import ForwardOutputs
from lightning_ood.detectors.functional import ash_b, ash_p, ash_s
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead
from tests.detectors.helpers import head_outputs


def test_hand_example_through_identity_head():
    # Identity head: logits are the shaped features themselves.
    head = nn.Identity()
    detector = ASH("b", 50)
    detector.attach(head)
    out = ForwardOutputs(logits=torch.zeros(1, 4), features=torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert torch.equal(detector.shaped_logits(out), torch.tensor([[0.0, 0.0, 5.0, 5.0]]))
    expected = math.log(2 + 2 * math.exp(5.0))
    torch.testing.assert_close(detector(out), torch.tensor([expected]))


@pytest.mark.parametrize("variant, shaped", [
    ("p", [0.0, 0.0, 3.0, 4.0]),                                            # prune the lower half
    ("b", [0.0, 0.0, 5.0, 5.0]),                                            # kept = sum(x) / k = 10 / 2
    ("s", [0.0, 0.0, 3.0 * math.exp(10 / 7), 4.0 * math.exp(10 / 7)]),      # x exp(sum all / sum kept)
])
def test_hand_examples_of_every_variant(variant, shaped):
    detector = ASH(variant, 50)
    detector.attach(nn.Identity())
    out = ForwardOutputs(logits=torch.zeros(1, 4), features=torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    torch.testing.assert_close(detector.shaped_logits(out), torch.tensor([shaped]))
    expected = math.log(sum(math.exp(v) for v in shaped))  # energy of the shaped logits
    torch.testing.assert_close(detector(out), torch.tensor([expected]))


def _reference_shaping(x: torch.Tensor, variant: str, percentile: float) -> torch.Tensor:
    """ASH written out per sample with a sort (independent of the detector's functional code)."""
    rows = []
    for row in x.double():
        k = row.numel() - int(round(row.numel() * percentile / 100))
        order = torch.sort(row, descending=True).indices
        kept = torch.zeros_like(row)
        kept[order[:k]] = row[order[:k]]
        if variant == "b":
            kept[order[:k]] = row.sum() / k
        elif variant == "s":
            kept = kept * math.exp(float(row.sum() / row[order[:k]].sum()))
        rows.append(kept)
    return torch.stack(rows).float()


@pytest.mark.parametrize("variant, fn", [("p", ash_p), ("b", ash_b), ("s", ash_s)])
def test_through_linear_head(variant, fn):
    torch.manual_seed(0)
    head = LinearHead(32, 5)
    features = torch.rand(6, 32) + 0.1  # positive and distinct: which values are kept is unambiguous
    out = head_outputs(head, features)
    before = features.clone()
    detector = ASH(variant, 75)
    detector.attach(head)
    with torch.no_grad():
        logits = detector.shaped_logits(out)
        expected = head(_reference_shaping(features, variant, 75))
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fn(features, 75), _reference_shaping(features, variant, 75), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(detector(out), torch.logsumexp(expected, dim=1), atol=1e-4, rtol=1e-4)
    assert torch.equal(features, before)
    assert detector.name == f"ash_{variant}"


def test_through_isomax_plus_head():
    torch.manual_seed(0)
    head = IsoMaxPlusHead(32, 5)
    features = torch.relu(torch.randn(6, 32))
    detector = ASH("s", 90)
    detector.attach(head)
    with torch.no_grad():
        score = detector(head_outputs(head, features))
        expected = torch.logsumexp(head(_reference_shaping(features, "s", 90)), dim=1)
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
            score = detector(head_outputs(head, features))
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


# ------------------------------------------------ 1x8 hand examples through a 2-class head
#: Sum 18. At percentile 65, round(8 * 0.65) = round(5.2) = 5 values are pruned and k = 3 kept:
#: 6, 4 and 3 (positions 4, 6, 1). At 90, round(7.2) = 7 are pruned and k = 1: only the 6.
X8 = [0.5, 3.0, 0.0, 2.0, 6.0, 1.0, 4.0, 1.5]
E65 = math.exp(18 / 13)  # ASH-S scale exp(s1 / s2): s1 = 18, s2 = 6 + 4 + 3 = 13
E90 = math.exp(18 / 6)
SHAPERS = {"p": ash_p, "b": ash_b, "s": ash_s}


def _hand_head() -> LinearHead:
    """logit 0 = the sum of the 8 values; logit 1 = value 4 - value 1 + 1."""
    head = LinearHead(8, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0] = 1.0
        head.weight[1, 4], head.weight[1, 1] = 1.0, -1.0
        head.bias.copy_(torch.tensor([0.0, 1.0]))
    return head


@pytest.mark.parametrize("variant, percentile, shaped, logits", [
    ("p", 65, [0, 3, 0, 0, 6, 0, 4, 0], [13.0, 6 - 3 + 1]),
    ("b", 65, [0, 6, 0, 0, 6, 0, 6, 0], [18.0, 6 - 6 + 1]),                       # s1 / k = 18 / 3
    ("s", 65, [0, 3 * E65, 0, 0, 6 * E65, 0, 4 * E65, 0], [13 * E65, 3 * E65 + 1]),
    ("p", 90, [0, 0, 0, 0, 6, 0, 0, 0], [6.0, 7.0]),
    ("b", 90, [0, 0, 0, 0, 18, 0, 0, 0], [18.0, 19.0]),                          # s1 / k = 18 / 1
    ("s", 90, [0, 0, 0, 0, 6 * E90, 0, 0, 0], [6 * E90, 6 * E90 + 1]),
])
def test_hand_numbers_of_a_1x8_feature(variant, percentile, shaped, logits):
    features = torch.tensor([X8])
    detector = ASH(variant, percentile)
    detector.attach(_hand_head())
    out = ForwardOutputs(logits=torch.zeros(1, 2), features=features)
    with torch.no_grad():
        torch.testing.assert_close(SHAPERS[variant](features, percentile),
                                   torch.tensor([shaped], dtype=torch.float32))
        torch.testing.assert_close(detector.shaped_logits(out), torch.tensor([logits]))
        energy = max(logits) + math.log(sum(math.exp(v - max(logits)) for v in logits))
        torch.testing.assert_close(detector(out), torch.tensor([energy]))
    assert torch.equal(features, torch.tensor([X8]))  # not shaped in place


def test_a_later_fraction_is_refused_too_and_valid_values_pass():
    detector = ASH("s", 90)
    with pytest.raises(ValueError, match=r"did you mean 50\? Pass allow_small_percentile=True"):
        detector.percentile = 0.5  # e.g. a tuning grid written as fractions
    assert detector.percentile == 90.0
    for valid in (0, 1.5, 10, 65, 95, 99, 100):
        detector.percentile = valid
        assert detector.percentile == valid
    allowed = ASH("p", 1, allow_small_percentile=True)
    allowed.percentile = 0.5
    assert allowed.percentile == 0.5
    with pytest.raises(ValueError, match="0-100 scale"):
        ASH("s", 0.9, allow_small_percentile=True).percentile = 101
