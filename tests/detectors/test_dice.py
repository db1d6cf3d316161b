"""Tests of DICE (Sun & Li, ECCV 2022)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

import lightning_ood.detectors.dice as dice_module
from lightning_ood.deploy.program import ScoreProbe
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.dice import DICE, dice_mask
from lightning_ood.detectors.registry import build_detector
from lightning_ood.evaluation import tuning as tuning_api
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead
from tests.detectors.helpers import head_outputs

W = [[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]]
B = [0.25, -0.5]


def _head(weight=W, bias=B) -> nn.Linear:
    head = LinearHead(len(weight[0]), len(weight))
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
        head.bias.copy_(torch.tensor(bias))
    return head


def _fitted(train: torch.Tensor, sparsity: float = 50.0, head: nn.Module = None) -> DICE:
    det = DICE(sparsity)
    det.attach(head if head is not None else _head())
    det.fit(FitData(features=train))
    return det


# training mean (1, 2, 0.5): two samples averaging to it
TRAIN = torch.tensor([[0.5, 3.0, 1.0], [1.5, 1.0, 0.0]])


def test_hand_computed_mask_on_a_2x3_weight():
    # V = W * m = [[1, -4, 1.5], [0.5, 8, -0.5]]; sorted [-4, -0.5, 0.5, 1, 1.5, 8];
    # 50th percentile: h = 5 * 0.5 = 2.5 -> 0.5 + 0.5 * (1 - 0.5) = 0.75; keep V > 0.75
    mask, threshold = dice_mask(torch.tensor(W), torch.tensor([1.0, 2.0, 0.5]), 50)
    assert threshold.item() == 0.75
    assert mask.tolist() == [[True, False, True], [False, True, False]]
    det = _fitted(TRAIN, 50.0)
    torch.testing.assert_close(det.mean_feature, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    assert det.mask.tolist() == [[True, False, True], [False, True, False]]
    assert int(det.kept_weights) == 3 and det.contribution_threshold.item() == 0.75
    # masked W = [[1, 0, 3], [0, 4, 0]]; f = (1, 1, 1): logits (4.25, 3.5)
    f = torch.tensor([[1.0, 1.0, 1.0]])
    head = det._head[0]
    torch.testing.assert_close(det.shaped_logits(head_outputs(head, f)), torch.tensor([[4.25, 3.5]]))
    torch.testing.assert_close(det(head_outputs(head, f)), torch.tensor([math.log(math.exp(4.25) + math.exp(3.5))]))


def test_threshold_equals_numpy_on_random_contributions():
    torch.manual_seed(0)
    weight, mean = torch.randn(10, 32), torch.rand(32)
    contribution = weight.double().numpy() * mean.double().numpy()[None, :]
    for p in (0, 50, 70, 90, 99):
        mask, threshold = dice_mask(weight, mean, p)
        expected = np.percentile(contribution, p)
        assert threshold.item() == float(expected)
        assert np.array_equal(mask.numpy(), contribution > expected)
        assert abs(mask.float().mean().item() - (1 - p / 100)) < 0.01


def test_higher_is_in_distribution():
    torch.manual_seed(0)
    head = LinearHead(16, 4)
    with torch.no_grad():
        head.weight.copy_(torch.rand(4, 16))
        head.bias.zero_()
    train = torch.rand(64, 16)
    train[:, :4] += 2.0  # units 0-3 are the ones ID images use
    det = _fitted(train, 70.0, head)
    id_features = torch.rand(8, 16)
    id_features[:, :4] += 2.0
    ood = torch.rand(8, 16)
    ood[:, 8:] += 2.0  # as much activation, on units DICE pruned
    assert det(head_outputs(head, id_features)).min() > det(head_outputs(head, ood)).max()


def test_finite_on_zero_constant_and_huge_inputs():
    det = _fitted(TRAIN)
    head = det._head[0]
    for features in (torch.zeros(3, 3), torch.full((2, 3), 5.0), torch.full((2, 3), 1e30), torch.full((2, 3), -1e30)):
        assert torch.isfinite(det(ForwardOutputs(torch.zeros(features.shape[0], 2), features))).all()
    torch.testing.assert_close(det(head_outputs(head, torch.zeros(1, 3))), torch.logsumexp(torch.tensor([B]), 1))
    # zero or constant training features: a mask still exists and scores stay finite
    for train in (torch.zeros(4, 3), torch.full((4, 3), 2.0)):
        fitted = _fitted(train)
        assert torch.isfinite(fitted(head_outputs(head, torch.rand(3, 3)))).all()


def test_wrong_shapes_nan_and_bad_arguments():
    det = _fitted(TRAIN)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        det(ForwardOutputs(torch.zeros(2, 2), torch.zeros(2, 4)))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        det(ForwardOutputs(torch.zeros(2, 2), torch.zeros(3)))
    bad = torch.rand(2, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(ForwardOutputs(torch.zeros(2, 2), bad))
    fresh = DICE()
    fresh.attach(_head())
    with pytest.raises(ValueError, match="NaN or infinite"):
        fresh.fit(FitData(features=bad))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        fresh.fit(FitData(features=torch.rand(2, 4)))
    assert not bool(fresh.fitted)
    for value in (-1, 0.9, 100, 120):
        with pytest.raises(ValueError, match="0-100|\\[0, 100\\)"):
            DICE(value)
    with pytest.raises(RuntimeError, match="attach"):
        DICE().fit(FitData(features=TRAIN))


def test_distance_heads_are_skipped():
    reason = DICE().skip_reason(IsoMaxPlusHead(3, 2))
    assert reason and "linear" in reason and "\n" not in reason
    with pytest.raises(ValueError, match="linear"):
        DICE().attach(IsoMaxPlusHead(3, 2))
    assert DICE().skip_reason(_head()) is None


def test_chunked_fit_and_two_ranks_equal_the_whole_fit(monkeypatch):
    train = torch.rand(11, 3, generator=torch.Generator().manual_seed(3))
    whole = _fitted(train, 50.0)
    monkeypatch.setattr(dice_module, "CHUNK_ROWS", 2)
    chunked = _fitted(train, 50.0)
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(chunked.state_dict()[key], value, rtol=1e-15, atol=0)
    # simulated 2 ranks: rank 1 records what it contributes, rank 0 adds it to its own
    sent = []

    def record(tensor, op="sum"):
        sent.append(tensor.clone())
        return tensor.clone()

    monkeypatch.setattr(dice_module, "all_reduce", record)
    _fitted(train[6:], 50.0)
    from_rank_1 = iter(sent)
    monkeypatch.setattr(dice_module, "all_reduce", lambda t, op="sum": t + next(from_rank_1))
    rank_0 = _fitted(train[:6], 50.0)
    assert len(sent) == 2
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(rank_0.state_dict()[key], value, rtol=1e-15, atol=0)


def test_state_dict_round_trip_into_a_fresh_attached_detector():
    head = _head()
    det = _fitted(TRAIN, 50.0, head)
    fresh = DICE(50.0)
    fresh.attach(head)
    fresh.load_state_dict(det.state_dict(), strict=True)
    assert bool(fresh.fitted)
    features = torch.rand(5, 3)
    assert torch.equal(fresh(head_outputs(head, features)), det(head_outputs(head, features)))
    fresh.attach(head)  # attaching again keeps the fit
    assert torch.equal(fresh.mask, det.mask) and bool(fresh.fitted)
    assert list(det.parameters()) == [] and list(det.children()) == []


def test_registry_defaults_and_sparsity_changes_the_mask():
    assert build_detector("dice", "imagenet").sparsity == 70.0
    assert build_detector("dice", "cifar100").sparsity == 90.0
    det = _fitted(TRAIN, 50.0)
    assert det.set_hyperparameters(sparsity=50.0) is False
    assert det.set_hyperparameters(sparsity=0.0) is False  # the mask is rebuilt from the kept mean: no refit
    unfitted = DICE(50.0)
    assert unfitted.set_hyperparameters(sparsity=0.0) is True
    # p = 0: threshold = min(V) = -4, so every entry but the -4 one is kept (strict >)
    assert det.mask.tolist() == [[True, False, True], [True, True, True]]
    refit = _fitted(TRAIN, 0.0)
    assert torch.equal(refit.mask, det.mask)
    assert det.describe() == {"class": "DICE", "sparsity": 0.0, "num_fit_images": 2,
                              "contribution_threshold": -4.0, "kept_weights": 5}


def test_exports_with_a_dynamic_batch():
    head = LinearHead(8, 3)
    det = _fitted(torch.rand(20, 8), 70.0, head)
    batch = Dim("batch", min=1)
    program = torch.export.export(ScoreProbe(det), (torch.zeros(3, 3), torch.rand(3, 8)),
                                  dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    features = torch.rand(6, 8)
    torch.testing.assert_close(program.module()(torch.zeros(6, 3), features),
                               det(ForwardOutputs(torch.zeros(6, 3), features)), atol=1e-6, rtol=1e-6)


def test_tuning_returns_the_best_sparsity():
    tuning = tuning_api
    torch.manual_seed(0)
    head = LinearHead(16, 4)
    with torch.no_grad():
        head.weight.copy_(torch.rand(4, 16))
    train = torch.rand(64, 16)
    train[:, :4] += 2.0
    id_features = torch.rand(40, 16)
    id_features[:, :4] += 2.0
    ood = torch.rand(40, 16)
    ood[:, 8:] += 2.0
    det = _fitted(train, 90.0, head)
    data = tuning.TuningData(head_outputs(head, id_features), head_outputs(head, ood), "ood_val", "synthetic")
    result = tuning.tune_detector(det, data, FitData(features=train), {"sparsity": (0.0, 50.0, 90.0)})
    assert result is not None
    best = max(e["auroc"] for e in result["grid"])
    assert [e["auroc"] for e in result["grid"] if e["sparsity"] == result["parameters"]["sparsity"]] == [best]
    assert det.sparsity == result["parameters"]["sparsity"] == float(det.fitted_sparsity)
    expected, _ = dice_mask(head.weight, det.mean_feature, det.sparsity)
    assert torch.equal(det.mask, expected)
