"""Tests of GEN (Liu, Lochman, Zach, CVPR 2023)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch.export import Dim

from lightning_ood.deploy.program import ScoreProbe
from lightning_ood.detectors.base import ForwardOutputs
from lightning_ood.detectors.gen import GEN, generalized_entropy_score
from lightning_ood.detectors.registry import build_detector
from lightning_ood.evaluation import tuning as tuning_api
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead


def _out(logits: torch.Tensor) -> ForwardOutputs:
    return ForwardOutputs(logits=logits, features=torch.zeros(logits.shape[0], 2))


def _reference(logits: np.ndarray, gamma: float, M: int) -> np.ndarray:
    """The authors' formula in plain float64 NumPy: softmax, sort, top-M, -sum p^g (1-p)^g."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top = np.sort(p, axis=1)[:, -M:]
    return -np.sum(top ** gamma * (1 - top) ** gamma, axis=1)


def test_hand_computed_three_classes():
    # softmax of (0, ln 2, ln 3) = (1/6, 2/6, 3/6)
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]])
    p = [1 / 6, 2 / 6, 3 / 6]
    # gamma = 1: sum p (1 - p) = 5/36 + 8/36 + 9/36 = 22/36
    torch.testing.assert_close(generalized_entropy_score(logits, 1.0, 3), torch.tensor([-22 / 36]))
    # gamma = 1/2, M = 2: only the two largest, sqrt(9/36) + sqrt(8/36)
    expected = -(0.5 + math.sqrt(8 / 36))
    torch.testing.assert_close(generalized_entropy_score(logits, 0.5, 2), torch.tensor([expected]))
    # M larger than C uses every class
    expected = -sum(math.sqrt(q * (1 - q)) for q in p)
    torch.testing.assert_close(GEN(0.5, 100)(_out(logits)), torch.tensor([expected]))


def test_matches_the_authors_formula_on_random_logits():
    torch.manual_seed(0)
    logits = torch.randn(6, 20) * 3
    for gamma, M in ((0.1, 100), (0.1, 5), (2.0, 10), (0.01, 1)):
        ref = _reference(logits.numpy(), gamma, M)
        got = generalized_entropy_score(logits, gamma, M)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_higher_is_in_distribution_and_confident_samples_do_not_tie():
    confident = torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    uniform = torch.zeros(1, 4)
    det = GEN(0.1, 100)
    assert det(_out(confident)) > det(_out(uniform))
    # p = 1 - 2e-13 and 1 - 2e-17 round to exactly 1 in float32 (and the second in float64):
    # the log-space complement still orders them
    scores = generalized_entropy_score(torch.tensor([[30.0, 0.0, 0.0], [40.0, 0.0, 0.0]]), 0.1, 3)
    assert scores[1] > scores[0]
    # hand value for the second: the top term is (2 e^-40)^0.1 up to (1 - p)^0.1 ~ 1
    lse = 40.0 + math.log1p(2 * math.exp(-40.0))
    small = 2 * (math.exp(0.1 * (0.0 - lse)) * (1 - math.exp(-lse)) ** 0.1)
    top = math.exp(0.1 * ((40.0 - lse) + (math.log(2.0) - lse)))
    assert scores[1].item() == pytest.approx(-(top + small), rel=1e-6)


def _log_space_reference(logits: np.ndarray, gamma: float, M: int) -> np.ndarray:
    """The definition in float64 log space, row by row: log p from logsumexp, and for the most
    probable class log(1 - p) as the logsumexp of the other classes (exact where 1 - p rounds)."""
    scores = []
    for row in logits.astype(np.float64):
        log_p = row - logsumexp(row)
        order = np.argsort(-row, kind="stable")[:M]
        terms = []
        for rank, j in enumerate(order):
            log_q = logsumexp(np.delete(log_p, j)) if rank == 0 else np.log1p(-np.exp(log_p[j]))
            terms.append(np.exp(gamma * (log_p[j] + log_q)))
        scores.append(-sum(terms))
    return np.array(scores)


@pytest.mark.parametrize("M", [1, 2, 7, 12])
def test_exact_across_regimes_on_both_selection_paths(M):
    # ordinary, peaked (gaps past float32's exp range, where a sum of exp(x - max) underflows),
    # tied maxima, huge magnitudes and near ties at a large offset
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(20, 12, generator=g) * scale for scale in (0.1, 3.0, 40.0, 300.0)]
    tied = torch.randn(4, 12, generator=g)
    tied[:, 5] = tied[:, 2] = tied.max(dim=1).values + 1.0
    offset = 1e4 + torch.randn(4, 12, generator=g) * 1e-2
    peaked = torch.full((2, 12), -150.0)
    peaked[:, 0] = 0.0
    peaked[1, 1] = -120.0
    logits = torch.cat(rows + [tied, offset, peaked, torch.zeros(1, 12)])
    for gamma in (0.01, 0.1, 2.0):
        expected = _log_space_reference(logits.numpy(), gamma, M)
        eager = generalized_entropy_score(logits, gamma, M)  # numpy selection on the CPU
        sorted_path = generalized_entropy_score(logits.clone().requires_grad_(True), gamma, M).detach()
        # relative to the float64 value, down to float32's smallest normal number
        np.testing.assert_allclose(eager.numpy(), expected, rtol=2e-5, atol=1e-37)
        np.testing.assert_allclose(sorted_path.numpy(), expected, rtol=2e-5, atol=1e-37)
        torch.testing.assert_close(eager, sorted_path, rtol=1e-6, atol=1e-37)
        # float64 logits are scored in float64
        double = generalized_entropy_score(logits.double(), gamma, M)
        assert double.dtype == torch.float64
        np.testing.assert_allclose(double.numpy(), expected, rtol=1e-10, atol=0)  # the offset rows: ulp(1e4) ~ 2e-12
    # peaked rows: the terms are exp(0.1 * log p) ~ e^-15, far from 0, and the top's own term is
    # (sum of the others' p)^0.1
    assert (generalized_entropy_score(peaked, 0.1, M) < -1e-7).all()


def test_finite_on_zero_constant_huge_and_single_class():
    det = GEN()
    for logits in (torch.zeros(3, 5), torch.full((2, 5), 7.0), torch.tensor([[1e30, -1e30, 0.0, 3e38, -3e38]]),
                   torch.randn(4, 1)):
        score = det(_out(logits))
        assert score.shape == (logits.shape[0],) and torch.isfinite(score).all()
    # one class: p = 1, the entropy is 0
    assert torch.equal(det(_out(torch.randn(4, 1))), torch.zeros(4))
    # uniform over C classes with M >= C: -C (1/C)^g (1 - 1/C)^g
    torch.testing.assert_close(det(_out(torch.zeros(1, 5))), torch.tensor([-5 * (0.2 * 0.8) ** 0.1]))


def test_wrong_shapes_nan_and_bad_arguments():
    det = GEN()
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        det(_out(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        det(ForwardOutputs(logits=torch.zeros(2, 3, 4), features=torch.zeros(2, 2)))
    bad = torch.zeros(2, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(_out(bad))
    for gamma, M in ((0.0, 10), (-1.0, 10), (float("inf"), 10), (0.1, 0), (0.1, 2.5)):
        with pytest.raises(ValueError):
            GEN(gamma, M)


def test_attach_caps_M_and_the_grid_at_the_number_of_classes():
    det = GEN(0.1, 100)
    det.attach(LinearHead(8, 10))
    assert det.M == 10
    candidates = det.tuning_candidates()
    assert {c["M"] for c in candidates} == {10}
    assert sorted(c["gamma"] for c in candidates) == [0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0]
    det.set_hyperparameters(M=1000)
    assert det.M == 10
    distance = GEN(0.1, 100)
    distance.attach(IsoMaxPlusHead(8, 7))
    assert distance.M == 7 and distance.skip_reason(IsoMaxPlusHead(8, 7)) is None
    big = GEN(0.1, 100)
    big.attach(LinearHead(8, 1000))
    assert big.M == 100 and {c["M"] for c in big.tuning_candidates()} == {10, 50, 100, 200, 500, 1000}


def test_registry_defaults_and_state_dict():
    det = build_detector("gen", "imagenet")
    assert (det.gamma, det.M) == (0.1, 100) and not det.requires_fit
    assert build_detector("gen", "cifar10").hyperparameters() == {"gamma": 0.1, "M": 100}
    assert list(det.state_dict()) == ["fitted"]
    fresh = GEN(det.gamma, det.M)
    fresh.load_state_dict(det.state_dict(), strict=True)
    logits = torch.randn(5, 12)
    assert torch.equal(fresh(_out(logits)), det(_out(logits)))
    assert det.describe() == {"class": "GEN", "gamma": 0.1, "M": 100}


def test_exports_with_a_dynamic_batch():
    det = GEN(0.1, 5)
    det.attach(LinearHead(4, 12))
    batch = Dim("batch", min=1)
    example = (torch.randn(3, 12), torch.rand(3, 4))
    program = torch.export.export(ScoreProbe(det), example, dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    logits, features = torch.randn(7, 12) * 4, torch.rand(7, 4)
    torch.testing.assert_close(program.module()(logits, features), det(ForwardOutputs(logits, features)),
                               atol=1e-6, rtol=1e-6)


def test_tuning_returns_the_best_candidate():
    torch.manual_seed(0)
    # ID: one clear winner among 50 classes; OOD: flatter logits
    id_logits = torch.randn(40, 50)
    id_logits[torch.arange(40), torch.arange(40) % 50] += 6.0
    ood_logits = torch.randn(40, 50) * 1.5
    det = GEN(0.1, 100)
    det.attach(LinearHead(4, 50))
    tuning = tuning_api
    data = tuning.TuningData(_out(id_logits), _out(ood_logits), "ood_val", "synthetic")
    result = tuning.tune_detector(det, data, None, {"gamma": (0.1, 1.0, 5.0), "M": (1, 10, 50)})
    assert result is not None
    best = max(entry["auroc"] for entry in result["grid"])
    chosen = result["parameters"]
    assert [e["auroc"] for e in result["grid"] if {"gamma": e["gamma"], "M": e["M"]} == chosen] == [best]
    assert det.hyperparameters() == chosen
    assert best > 0.9
