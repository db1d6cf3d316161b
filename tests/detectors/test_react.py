"""Tests of ReAct (Sun, Guo, Li, NeurIPS 2021)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

import lightning_ood.detectors.react as react_module
from lightning_ood.deploy.program import ScoreProbe
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.react import ReAct, linear_percentile
from lightning_ood.detectors.registry import build_detector
from lightning_ood.evaluation import tuning as tuning_api
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead
from tests.detectors.helpers import head_outputs, linear_head


def _fitted(train: torch.Tensor, percentile: float = 90.0, head: nn.Module = None) -> ReAct:
    det = ReAct(percentile)
    det.attach(head if head is not None else LinearHead(train.shape[1], 3))
    det.fit(FitData(features=train))
    return det


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_percentile_equals_numpy_exactly(dtype):
    generator = torch.Generator().manual_seed(0)
    for shape in ((1,), (2,), (7, 3), (50, 13), (1000,)):
        values = (torch.randn(shape, generator=generator) * 3).to(dtype)
        for q in (0, 0.5, 10, 33.3, 50, 85, 90, 95, 99, 99.99, 100):
            got = linear_percentile(values, q)
            expected = np.percentile(values.numpy(), q)
            assert got.dtype == dtype
            assert got.item() == float(expected), (shape, q)
    ties = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 5.0], dtype=dtype)
    for q in (0, 20, 40, 60, 80, 100):
        assert linear_percentile(ties, q).item() == float(np.percentile(ties.numpy(), q))


def test_percentile_by_hand_and_errors():
    # sorted [1, 2, 3, 4]: h = 3 * 0.9 = 2.7 -> 3 + 0.7 * (4 - 3)
    assert linear_percentile(torch.tensor([[4.0, 1.0], [3.0, 2.0]], dtype=torch.float64), 90).item() == pytest.approx(3.7)
    assert linear_percentile(torch.tensor([4.0, 1.0, 3.0, 2.0]), 0).item() == 1.0
    assert linear_percentile(torch.tensor([4.0, 1.0, 3.0, 2.0]), 100).item() == 4.0
    with pytest.raises(ValueError, match="at least one"):
        linear_percentile(torch.zeros(0), 50)
    with pytest.raises(ValueError, match="0-100"):
        linear_percentile(torch.zeros(3), 101)
    with pytest.raises(TypeError):
        linear_percentile(torch.arange(3), 50)


def test_fit_threshold_and_hand_computed_score():
    # training values 1..10 (5 samples x 2 units): 90th percentile = 9 + 0.1 * (10 - 9) = 9.1
    train = torch.arange(1.0, 11.0).reshape(5, 2)
    head = linear_head([[1.0, 0.0], [0.0, 2.0]], [0.0, 1.0])
    det = _fitted(train, 90.0, head)
    assert det.threshold.item() == pytest.approx(9.1) and det._threshold == pytest.approx(9.1)
    assert int(det.num_fit_images) == 5
    # feature (20, 3) is clipped to (9.1, 3): logits (9.1, 7), energy log(e^9.1 + e^7)
    features = torch.tensor([[20.0, 3.0]])
    torch.testing.assert_close(det.shaped_logits(head_outputs(head, features)), torch.tensor([[9.1, 7.0]]))
    expected = math.log(math.exp(9.1) + math.exp(7.0))
    torch.testing.assert_close(det(head_outputs(head, features)), torch.tensor([expected]))
    # features under the threshold are untouched: plain energy
    small = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(det(head_outputs(head, small)), torch.logsumexp(head(small), dim=1).detach())
    assert det.describe()["threshold"] == pytest.approx(9.1) and det.describe()["percentile"] == 90.0


def test_higher_is_in_distribution():
    torch.manual_seed(0)
    head = LinearHead(16, 4)
    with torch.no_grad():
        head.weight.copy_(torch.rand(4, 16))
    train = torch.rand(64, 16)
    det = _fitted(train, 90.0, head)
    id_features = torch.rand(8, 16)
    # OOD: a few huge activations (the behaviour ReAct targets) but a smaller typical value
    ood = torch.rand(8, 16) * 0.2
    ood[:, :2] += 50.0
    assert det(head_outputs(head, id_features)).min() > det(head_outputs(head, ood)).max()
    # without clipping the spikes would win
    assert torch.logsumexp(head(ood), 1).min() > torch.logsumexp(head(id_features), 1).max()


def test_finite_on_zero_constant_and_huge_inputs():
    head = LinearHead(6, 3)
    det = _fitted(torch.rand(10, 6), head=head)
    for features in (torch.zeros(3, 6), torch.full((2, 6), 4.0), torch.full((2, 6), 1e30), -torch.full((2, 6), 1e30)):
        score = det(head_outputs(head, features) if features.abs().max() < 1e20 else ForwardOutputs(torch.zeros(2, 3), features))
        assert torch.isfinite(score).all()
    constant = _fitted(torch.full((4, 6), 2.0), head=head)
    assert constant.threshold.item() == 2.0
    assert torch.isfinite(constant(head_outputs(head, torch.rand(3, 6) * 5))).all()


def test_wrong_shapes_and_nan():
    head = LinearHead(6, 3)
    det = _fitted(torch.rand(10, 6), head=head)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        det(ForwardOutputs(torch.zeros(2, 3), torch.zeros(2, 5)))
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        det(ForwardOutputs(torch.zeros(2, 3), torch.zeros(2, 6, 1)))
    bad = torch.rand(2, 6)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(ForwardOutputs(torch.zeros(2, 3), bad))
    fresh = ReAct()
    fresh.attach(head)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fresh.fit(FitData(features=bad))
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        fresh.fit(FitData(features=torch.rand(4, 5)))
    assert not bool(fresh.fitted)
    with pytest.raises(RuntimeError, match="fit"):
        fresh(ForwardOutputs(torch.zeros(2, 3), torch.rand(2, 6)))
    for value in (0, 0.9, 101):
        with pytest.raises(ValueError, match="0-100"):
            ReAct(value)


def test_two_ranks_match_one(monkeypatch):
    """Simulated 2-rank fit: each rank gathers both shards, the threshold is the exact
    percentile of the whole data, as on one process."""
    train = torch.rand(9, 5, generator=torch.Generator().manual_seed(1))
    whole = _fitted(train, 85.0)
    shards = (train[:4], train[4:])
    for rank in range(2):
        monkeypatch.setattr(react_module, "all_gather_rows", lambda t, r=rank: torch.cat(
            [t if i == r else shards[i] for i in range(2)]))
        det = _fitted(shards[rank], 85.0)
        for key, value in whole.state_dict().items():
            assert torch.equal(det.state_dict()[key], value), key
    assert whole.threshold.item() == float(np.percentile(train.numpy(), 85))


def test_state_dict_round_trip():
    head = LinearHead(6, 3)
    det = _fitted(torch.rand(10, 6), 95.0, head)
    fresh = ReAct(95.0)
    fresh.attach(head)
    fresh.load_state_dict(det.state_dict(), strict=True)
    assert bool(fresh.fitted) and fresh._threshold == det._threshold
    features = torch.rand(4, 6) * 2
    assert torch.equal(fresh(head_outputs(head, features)), det(head_outputs(head, features)))
    assert set(det.state_dict()) == {"fitted", "threshold", "fitted_percentile", "num_fit_images"}


def test_registry_flags_and_head_types():
    det = build_detector("react", "imagenet")
    assert det.percentile == 90.0 and det.requires_fit and det.changes_logits
    assert build_detector("react").percentile == 90.0
    distance = IsoMaxPlusHead(6, 3)
    det = _fitted(torch.rand(10, 6), head=distance)
    score = det(head_outputs(distance, torch.rand(3, 6)))
    assert torch.isfinite(score).all()


def test_exports_with_a_dynamic_batch():
    head = LinearHead(6, 3)
    det = _fitted(torch.rand(20, 6), head=head)
    batch = Dim("batch", min=1)
    example = (torch.zeros(3, 3), torch.rand(3, 6))
    program = torch.export.export(ScoreProbe(det), example, dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    features = torch.rand(7, 6) * 2
    torch.testing.assert_close(program.module()(torch.zeros(7, 3), features),
                               det(ForwardOutputs(torch.zeros(7, 3), features)), atol=1e-6, rtol=1e-6)


def test_tuning_refits_and_returns_the_best_percentile():
    tuning = tuning_api
    torch.manual_seed(0)
    head = LinearHead(16, 4)
    with torch.no_grad():
        head.weight.copy_(torch.rand(4, 16))
    train = torch.rand(64, 16)
    id_features = torch.rand(40, 16)
    ood = torch.rand(40, 16) * 0.3
    ood[:, :3] += torch.rand(40, 3) * 20
    det = _fitted(train, 99.0, head)
    fit_data = FitData(features=train)
    data = tuning.TuningData(head_outputs(head, id_features), head_outputs(head, ood), "ood_val", "synthetic")
    result = tuning.tune_detector(det, data, fit_data, {"percentile": (10.0, 50.0, 99.0)})
    assert result is not None
    best = max(e["auroc"] for e in result["grid"])
    assert [e["auroc"] for e in result["grid"] if e["percentile"] == result["parameters"]["percentile"]] == [best]
    assert det.percentile == result["parameters"]["percentile"]
    # the threshold was refitted for the chosen percentile
    assert det.threshold.item() == float(np.percentile(train.numpy(), det.percentile))
    assert det.set_hyperparameters(percentile=det.percentile) is False


def test_percentile_beyond_the_torch_quantile_size_limit():
    # torch.quantile refuses more than 2**24 elements; the fit's flattened (N, D) may exceed it
    values = torch.rand(2 ** 12 + 1, 2 ** 12, generator=torch.Generator().manual_seed(2))
    assert values.numel() > 2 ** 24
    assert linear_percentile(values, 90).item() == float(np.percentile(values.numpy(), 90))
