import math

import pytest
import torch

from lightning_ood.detectors.base import Detector, ForwardOutputs
from lightning_ood.detectors.baselines import MSP, Energy, MaxLogit, MinDistance, PenultimateNorm
from lightning_ood.nn.heads import IsoMaxPlusHead, L2NormalizedHead, LinearHead

ALL = [MSP, MaxLogit, Energy, MinDistance, PenultimateNorm]


def _outputs() -> ForwardOutputs:
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    features = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    return ForwardOutputs(logits=logits, features=features)


@pytest.mark.parametrize(
    "cls, expected",
    [
        (MSP, [0.75, 0.5]),
        (MaxLogit, [math.log(3.0), 2.0]),
        (Energy, [math.log(4.0), 2.0 + math.log(2.0)]),
        (MinDistance, [math.log(3.0), 2.0]),
        (PenultimateNorm, [5.0, 2.0]),
    ],
)
def test_scores_hand_example(cls, expected):
    detector = cls()
    out = _outputs()
    before = (out.logits.clone(), out.features.clone())
    torch.testing.assert_close(detector(out), torch.tensor(expected))
    assert torch.equal(out.logits, before[0]) and torch.equal(out.features, before[1])


@pytest.mark.parametrize("cls", ALL)
def test_names_flags_and_empty_state(cls):
    detector = cls()
    assert isinstance(detector, Detector)
    assert cls.name == {
        MSP: "msp",
        MaxLogit: "max_logit",
        Energy: "energy",
        MinDistance: "min_distance",
        PenultimateNorm: "penultimate_norm",
    }[cls]
    assert cls.__doc__
    assert not (detector.requires_fit or detector.requires_block_norms or detector.changes_logits)
    assert list(detector.state_dict()) == ["fitted"]
    detector.attach(LinearHead(3, 2))
    torch.testing.assert_close(detector.shaped_logits(_outputs()), _outputs().logits)


@pytest.mark.parametrize("cls", [MSP, MaxLogit, Energy, PenultimateNorm])
def test_generic_scores_apply_to_every_head(cls):
    for head in (LinearHead(3, 2), L2NormalizedHead(3, 2), IsoMaxPlusHead(3, 2)):
        assert cls().skip_reason(head) is None


def test_min_distance_only_for_isomax_plus():
    detector = MinDistance()
    assert detector.skip_reason(IsoMaxPlusHead(8, 4)) is None
    reason = detector.skip_reason(LinearHead(8, 4))
    assert isinstance(reason, str) and "IsoMaxPlusHead" in reason and "\n" not in reason


def test_min_distance_is_minus_the_smallest_distance():
    torch.manual_seed(0)
    head = IsoMaxPlusHead(8, 4)
    features = torch.randn(5, 8)
    with torch.no_grad():
        logits = head(features)
        scaled = torch.nn.functional.normalize(features, dim=1)
        protos = torch.nn.functional.normalize(head.prototypes, dim=1)
        min_dist = torch.cdist(scaled, protos).amin(dim=1)
    score = MinDistance()(ForwardOutputs(logits=logits, features=features))
    torch.testing.assert_close(score, -min_dist)
    assert (score <= 0).all()


def test_energy_finite_for_large_logits():
    logits = torch.tensor([[500.0, 120.0], [101.0, 101.0]])
    out = ForwardOutputs(logits=logits, features=torch.ones(2, 3))
    assert torch.isfinite(Energy()(out)).all()


@pytest.mark.parametrize("cls", ALL)
def test_non_finite_inputs_are_a_clear_error(cls):
    out = _outputs()
    out.logits[0, 0] = float("nan")
    out.features[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        cls()(out)
