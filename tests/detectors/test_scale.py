"""Tests of SCALE (Xu, Chen, Franchi, Yao, ICLR 2024)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.export import Dim

from lightning_ood.deploy.program import ScoreProbe
from lightning_ood.detectors.base import ForwardOutputs
from lightning_ood.detectors.registry import build_detector
from lightning_ood.detectors.scale import SCALE, scale_exponent, scale_features
from lightning_ood.evaluation import tuning as tuning_api
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead
from tests.detectors.helpers import head_outputs


def _attached(percentile: float, head: nn.Module) -> SCALE:
    det = SCALE(percentile)
    det.attach(head)
    return det


def _reference(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """Per sample with a sort: exp(sum(all) / sum(top k)) * x, k = n - round(n p / 100)."""
    rows = []
    for row in x.double():
        k = row.numel() - int(round(row.numel() * percentile / 100))
        top = torch.sort(row, descending=True).values[:k]
        rows.append(row * math.exp(float(row.sum() / top.sum())))
    return torch.stack(rows).to(x.dtype)


def test_hand_computed_scaling_factor():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # p = 50: k = 2, s1 = 10, s2 = 3 + 4 = 7, r = 10/7; nothing is pruned
    torch.testing.assert_close(scale_exponent(x, 50), torch.tensor([10 / 7]))
    torch.testing.assert_close(scale_features(x, 50), x * math.exp(10 / 7))
    # p = 75: k = 1, s2 = 4, r = 2.5
    torch.testing.assert_close(scale_exponent(x, 75), torch.tensor([2.5]))
    # p = 0: k = n, r = 1
    torch.testing.assert_close(scale_exponent(x, 0), torch.tensor([1.0]))
    det = _attached(50, nn.Identity())
    out = ForwardOutputs(logits=x, features=x)
    shaped = [v * math.exp(10 / 7) for v in (1, 2, 3, 4)]
    torch.testing.assert_close(det.shaped_logits(out), torch.tensor([shaped]))
    torch.testing.assert_close(det(out), torch.tensor([math.log(sum(math.exp(v) for v in shaped))]))


def test_through_a_linear_head_matches_the_reference():
    torch.manual_seed(0)
    head = LinearHead(32, 5)
    features = torch.rand(6, 32) + 0.1
    before = features.clone()
    det = _attached(85, head)
    with torch.no_grad():
        expected = head(_reference(features, 85))
        torch.testing.assert_close(det.shaped_logits(head_outputs(head, features)), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(det(head_outputs(head, features)), torch.logsumexp(expected, 1), atol=1e-4, rtol=1e-4)
    assert torch.equal(features, before)


def test_predictions_change_only_through_the_bias():
    x = torch.tensor([[1.0, 0.0]])
    # W = I, b = (0, 2): model logits (1, 2) -> class 1; r = 1 / 1, scaled logits (e, 2) -> class 0
    head = LinearHead(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.copy_(torch.tensor([0.0, 2.0]))
    det = _attached(50, head)
    assert int(head(x).argmax()) == 1
    torch.testing.assert_close(det.shaped_logits(head_outputs(head, x)), torch.tensor([[math.e, 2.0]]))
    assert int(det.shaped_logits(head_outputs(head, x)).argmax()) == 0
    with torch.no_grad():
        head.bias.zero_()
    features = torch.rand(20, 2)
    assert torch.equal(det.shaped_logits(head_outputs(head, features)).argmax(1), head(features).argmax(1))
    assert det.changes_logits and det.assumes_nonnegative_features and not det.requires_fit


def test_higher_is_in_distribution():
    # ID: strong activations of the units a class reads; OOD: weak, unstructured ones.
    torch.manual_seed(0)
    head = LinearHead(16, 4)
    with torch.no_grad():
        head.weight.copy_(torch.rand(4, 16))
        head.bias.zero_()
    det = _attached(85, head)
    id_features = torch.rand(8, 16) + 1.0
    ood_features = torch.rand(8, 16) * 0.3
    assert det(head_outputs(head, id_features)).min() > det(head_outputs(head, ood_features)).max()
    # r itself: spread-out activations give a larger exp(r) than one dominant unit
    spread, peaked = torch.full((1, 8), 1.0), torch.tensor([[4.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    torch.testing.assert_close(scale_exponent(spread, 75), torch.tensor([4.0]))          # 8 / 2
    torch.testing.assert_close(scale_exponent(peaked, 75), torch.tensor([4.7 / 4.1]))    # (4 + 7 * 0.1) / (4 + 0.1)


def test_finite_on_zero_constant_negative_and_huge_inputs():
    head = LinearHead(16, 4)
    det = _attached(85, head)
    for features in (torch.zeros(3, 16), torch.full((2, 16), 3.0), -torch.rand(3, 16), torch.randn(4, 16)):
        score = det(head_outputs(head, features))
        assert torch.isfinite(score).all()
    # zero features: s2 = 0, scale 1, logits = bias
    torch.testing.assert_close(det(head_outputs(head, torch.zeros(1, 16))), torch.logsumexp(head.bias, 0).reshape(1).detach())
    huge = torch.full((2, 16), 1e30)
    assert torch.isfinite(_attached(85, nn.Identity())(ForwardOutputs(huge, huge))).all()
    # the clamp of r keeps exp(r) finite even for sums that would give r = n / k = 1e6
    spiky = torch.zeros(1, 10 ** 6)
    spiky[0, 0] = 1.0
    assert torch.isfinite(scale_features(spiky, 99.9999)).all()


def test_wrong_shapes_nan_and_bad_percentiles():
    head = LinearHead(8, 3)
    det = _attached(85, head)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        det(ForwardOutputs(torch.zeros(2, 3), torch.zeros(2, 7)))
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        det(ForwardOutputs(torch.zeros(2, 3), torch.zeros(8)))
    bad = torch.rand(2, 8)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(ForwardOutputs(torch.zeros(2, 3), bad))
    for value in (-1, 0.85, 150):
        with pytest.raises(ValueError, match="0-100"):
            SCALE(value)
    assert det.skip_reason(LinearHead(8, 3)) is None
    assert "none" in SCALE(99).skip_reason(LinearHead(8, 3))
    with pytest.raises(RuntimeError, match="attach"):
        SCALE()(ForwardOutputs(torch.zeros(2, 3), torch.rand(2, 8)))


def test_registry_state_dict_and_head_reference():
    assert build_detector("scale", "imagenet").percentile == 85.0
    assert build_detector("scale", "cifar10").percentile == 65.0
    head = LinearHead(8, 3)
    det = _attached(85, head)
    det.set_hyperparameters(percentile=70)
    assert list(det.state_dict()) == ["fitted", "scale_percentile"] and list(det.parameters()) == []
    fresh = _attached(85, head)
    fresh.load_state_dict(det.state_dict(), strict=True)
    assert fresh.percentile == 70.0
    features = torch.rand(5, 8)
    assert torch.equal(fresh(head_outputs(head, features)), det(head_outputs(head, features)))
    distance = IsoMaxPlusHead(8, 3)
    assert torch.isfinite(_attached(85, distance)(head_outputs(distance, features))).all()


def test_exports_with_a_dynamic_batch():
    head = LinearHead(8, 3)
    det = _attached(85, head)
    batch = Dim("batch", min=1)
    example = (torch.zeros(3, 3), torch.rand(3, 8))
    program = torch.export.export(ScoreProbe(det), example, dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    features = torch.rand(6, 8)
    features[0] = 0.0  # the s2 = 0 guard in the program too
    torch.testing.assert_close(program.module()(torch.zeros(6, 3), features),
                               det(ForwardOutputs(torch.zeros(6, 3), features)), atol=1e-6, rtol=1e-6)


def test_tuning_returns_the_best_percentile():
    tuning = tuning_api
    torch.manual_seed(0)
    head = LinearHead(16, 4)
    with torch.no_grad():
        head.weight.copy_(torch.rand(4, 16))
    id_features = torch.rand(40, 16) * 0.2
    id_features[torch.arange(40), torch.arange(40) % 16] += 2.0
    ood = torch.rand(40, 16) * 0.4
    det = _attached(65, head)
    data = tuning.TuningData(head_outputs(head, id_features), head_outputs(head, ood), "ood_val", "synthetic")
    result = tuning.tune_detector(det, data, None, {"percentile": (10.0, 65.0, 90.0)})
    assert result is not None
    best = max(e["auroc"] for e in result["grid"])
    assert [e["auroc"] for e in result["grid"] if e["percentile"] == result["parameters"]["percentile"]] == [best]
    assert det.percentile == result["parameters"]["percentile"]
