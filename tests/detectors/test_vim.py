"""Tests of ViM (Wang et al., CVPR 2022)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim, export

from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.registry import build_detector
from lightning_ood.evaluation.tuning import TuningData, tune_detector
from lightning_ood.detectors.vim import VirtualLogitMatching, default_principal_dim
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead
from tests.detectors.test_mahalanobis import Probe, fit_on_two_ranks


def head_3d() -> nn.Linear:
    """W = [[1, 0, 0], [0, 1, 0]], b = (1, -2): pinv(W) = W^T, so u = -W^T b = (-1, 2, 0)."""
    head = LinearHead(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        head.bias.copy_(torch.tensor([1.0, -2.0]))
    return head


def out(head: nn.Module, features: torch.Tensor) -> ForwardOutputs:
    with torch.no_grad():
        return ForwardOutputs(head(features), features)


def random_problem(seed: int = 0, n: int = 150, dim: int = 8, classes: int = 4):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.2, dim)
    features = torch.relu(torch.randn(n, dim, generator=gen) * scales + 1.0)
    head = LinearHead(dim, classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, dim, generator=gen))
        head.bias.copy_(torch.randn(classes, generator=gen))
    return features, head


def fitted(features, head, **kw) -> VirtualLogitMatching:
    det = VirtualLogitMatching(**kw)
    det.attach(head)
    det.fit(FitData(features))
    return det


def numpy_vim(train: np.ndarray, test: np.ndarray, w: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """The authors' formulas: u = -pinv(W) b; eigenvectors of the (assume-centred) covariance
    of f - u by np.linalg.eig; NS = those after the `dim` largest eigenvalues;
    alpha = mean max logit / mean ||(f - u) NS||; score = -alpha ||(f - u) NS|| + logsumexp."""
    u = -np.linalg.pinv(w) @ b
    values, vectors = np.linalg.eig((train - u).T @ (train - u) / len(train))
    ns = np.real(vectors.T[np.argsort(-np.real(values))[dim:]].T)
    alpha = (train @ w.T + b).max(axis=1).mean() / np.linalg.norm((train - u) @ ns, axis=1).mean()
    logits = test @ w.T + b
    top = logits.max(axis=1, keepdims=True)
    energy = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return -alpha * np.linalg.norm((test - u) @ ns, axis=1) + energy


# ----------------------------------------------------------------------------- exact math
def test_hand_computed_3d_example() -> None:
    head = head_3d()
    u = torch.tensor([-1.0, 2.0, 0.0])
    # about u: spread 3 along x, 2 along y, 1 along z -> second moment diag(3, 4/3, 1/3)
    offsets = torch.tensor([[3.0, 0, 0], [-3.0, 0, 0], [0, 2.0, 0], [0, -2.0, 0], [0, 0, 1.0], [0, 0, -1.0]])
    det = fitted(u + offsets, head, principal_dim=2)
    torch.testing.assert_close(det.origin, u)
    torch.testing.assert_close(det.eigenvalues, torch.tensor([3.0, 4.0 / 3.0, 1.0 / 3.0], dtype=torch.float64))
    # residual axis z: train residuals 0,0,0,0,1,1 (mean 1/3); max logits 3,0,2,0,0,0 (mean 5/6)
    torch.testing.assert_close(det.alpha, torch.tensor(2.5, dtype=torch.float64))
    test = u + torch.tensor([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, -4.0]])
    # logits (1, 1), (0, 0), (0, 0); residuals 2, 0, 4
    expected = torch.tensor([1 + math.log(2) - 2.5 * 2, math.log(2), math.log(2) - 2.5 * 4])
    torch.testing.assert_close(det(out(head, test)), expected)
    assert det.describe() == {"class": "VirtualLogitMatching", "principal_dim": 2, "feature_dim": 3,
                              "alpha": 2.5, "n_train": 6}


@pytest.mark.parametrize("dim", [2, 4, 6])
def test_matches_independent_numpy_reference(dim: int) -> None:
    train, head = random_problem()
    test = random_problem(seed=1, n=20)[0] * 1.5
    det = fitted(train, head, principal_dim=dim, chunk_rows=16)
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    expected = numpy_vim(train.double().numpy(), test.double().numpy(), w, b, dim)
    torch.testing.assert_close(det(out(head, test)).double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-4)


def test_default_principal_dim_rule() -> None:
    assert [default_principal_dim(d) for d in (4096, 2048, 2047, 768, 767, 512, 3, 1)] == \
           [1000, 1000, 512, 512, 383, 256, 1, 0]
    det = build_detector("vim", "imagenet")
    det.attach(LinearHead(512, 10))
    assert det.principal_dim == 256 and det.hyperparameters() == {"principal_dim": 256}


def test_fit_logits_are_used_when_given_and_zero_residual_gives_alpha_zero() -> None:
    head = head_3d()
    offsets = torch.tensor([[3.0, 0, 0], [-3.0, 0, 0], [0, 2.0, 0], [0, -2.0, 0], [0, 0, 1.0], [0, 0, -1.0]])
    train = torch.tensor([-1.0, 2.0, 0.0]) + offsets
    det = VirtualLogitMatching(principal_dim=2)
    det.attach(head)
    det.fit(FitData(train, logits=torch.full((6, 2), 2.0)))  # mean max logit 2 -> alpha 6
    torch.testing.assert_close(det.alpha, torch.tensor(6.0, dtype=torch.float64))
    flat = nn.Linear(3, 2, bias=False)  # u = 0; data on the x axis: residual exactly 0
    line = torch.tensor([[1.0, 0, 0], [-2.0, 0, 0], [3.0, 0, 0]])
    det = fitted(line, flat, principal_dim=1)
    assert float(det.alpha) == 0.0
    test = torch.tensor([[0.0, 5.0, 5.0]])
    torch.testing.assert_close(det(out(flat, test)), torch.logsumexp(flat(test), dim=1).detach())


# ----------------------------------------------------------------------------- behaviour
def test_higher_is_in_distribution() -> None:
    train, head = random_problem(n=300)
    det = fitted(train, head, principal_dim=4)
    id_feats = random_problem(seed=2, n=50)[0]
    ood_feats = id_feats.clone()
    ood_feats[:, 4:] += 6.0  # large values along the low-variance (residual) directions
    id_scores, ood_scores = det(out(head, id_feats)), det(out(head, ood_feats))
    auroc = (id_scores.unsqueeze(1) > ood_scores.unsqueeze(0)).float().mean()
    assert float(auroc) > 0.95 and bool(id_scores.median() > ood_scores.median())


def test_chunked_and_two_rank_fits_equal_the_whole_fit() -> None:
    train, head = random_problem()
    test = random_problem(seed=3, n=9)[0]
    whole = fitted(train, head, principal_dim=3, chunk_rows=10_000)
    chunked = fitted(train, head, principal_dim=3, chunk_rows=7)

    def make():
        det = VirtualLogitMatching(principal_dim=3)
        det.attach(head)
        return det

    ranks = fit_on_two_ranks(make, [FitData(train[:60]), FitData(train[60:])])
    for other in (chunked, *ranks):
        torch.testing.assert_close(other.eigenvalues, whole.eigenvalues, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(other.alpha, whole.alpha, rtol=1e-6, atol=1e-8)
        assert int(other.n_train) == 150
        # eigenvector signs may differ: compare the residual projector and the scores
        r_o, r_w = other.basis[:, 3:].double(), whole.basis[:, 3:].double()
        torch.testing.assert_close(r_o @ r_o.t(), r_w @ r_w.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other(out(head, test)), whole(out(head, test)), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_into_a_default_detector() -> None:
    train, head = random_problem()
    det = fitted(train, head, principal_dim=3)
    assert set(det.state_dict()) == {"fitted", "principal_dim_buffer", "origin", "basis", "eigenvalues", "alpha",
                                     "n_train"}
    fresh = VirtualLogitMatching()  # default D_p = 4 for D = 8; the file's 3 wins
    fresh.attach(head)
    assert fresh.principal_dim == 4
    fresh.load_state_dict(det.state_dict(), strict=True)
    assert fresh.principal_dim == 3 and bool(fresh.fitted)
    assert torch.equal(fresh(out(head, train[:20])), det(out(head, train[:20])))
    assert list(det.state_dict()) == list(fresh.state_dict())
    for name, param in det.named_parameters():  # the head stays out of the detector
        raise AssertionError(name)


def test_torch_export_with_dynamic_batch() -> None:
    train, head = random_problem()
    det = fitted(train, head, principal_dim=5)
    batch = Dim("batch", min=1)
    example = out(head, train[:4])
    program = export(Probe(det), (example.logits, example.features), dynamic_shapes=({0: batch}, {0: batch}),
                     strict=False)
    test = out(head, random_problem(seed=4, n=11)[0])
    torch.testing.assert_close(program.module()(test.logits, test.features), det(test), rtol=1e-6, atol=1e-6)


def test_tuning_picks_the_best_principal_dim() -> None:
    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([4.0, 3.0, 0.3, 0.05])

    def draw(n):
        return torch.randn(n, 4, generator=gen) * scales

    head = LinearHead(4, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [-1.0, -1.0, 0, 0]]))
        head.bias.zero_()
    train = draw(400)
    ood = draw(100)
    ood[:, 2] += 3.0 * torch.sign(ood[:, 2])  # OOD along the third principal axis
    fit_data = FitData(train)
    det = fitted(train, head, principal_dim=3)
    data = TuningData(out(head, draw(100)), out(head, ood), "ood_val", "synthetic")
    assert det.tuning_candidates() == [{"principal_dim": v} for v in (3,)]  # grid values >= D=4 dropped
    result = tune_detector(det, data, fit_data, {"principal_dim": [1, 2, 3]})
    aurocs = {row["principal_dim"]: row["auroc"] for row in result["grid"]}
    assert result["parameters"] == {"principal_dim": max(aurocs, key=aurocs.get)} == {"principal_dim": 2}
    assert aurocs[2] > aurocs[3] + 0.2 and result["default"] == {"principal_dim": 3}
    assert det.principal_dim == 2 and bool(det.fitted)
    reference = fitted(train, head, principal_dim=2)
    torch.testing.assert_close(det.alpha, reference.alpha)


def test_set_hyperparameters_reports_staleness() -> None:
    train, head = random_problem()
    det = fitted(train, head, principal_dim=3)
    assert det.set_hyperparameters(principal_dim=3) is False and bool(det.fitted)
    assert det.set_hyperparameters(principal_dim=5) is True and not bool(det.fitted)
    assert det.set_hyperparameters(principal_dim=3) is True and bool(det.fitted)  # back to the fitted D_p
    with pytest.raises(ValueError, match="< D = 8"):
        det.set_hyperparameters(principal_dim=8)
    with pytest.raises(ValueError, match="no tunable"):
        det.set_hyperparameters(k=3)


def test_degenerate_inputs_stay_finite() -> None:
    train, head = random_problem()
    det = fitted(train, head, principal_dim=3)
    for feats in (torch.zeros(3, 8), torch.full((3, 8), 5.0), torch.full((3, 8), 1e30)):
        logits = torch.zeros(3, 4) if feats.abs().max() > 1e6 else head(feats).detach()
        assert bool(torch.isfinite(det(ForwardOutputs(logits, feats))).all())
    assert bool(torch.isfinite(det(ForwardOutputs(torch.full((2, 4), 1e30), torch.zeros(2, 8)))).all())
    const = fitted(torch.full((20, 8), 2.0), head)
    assert bool(torch.isfinite(const(out(head, train[:5]))).all())
    zero = fitted(torch.zeros(20, 8), head)
    assert bool(torch.isfinite(zero(out(head, train[:5]))).all())


def test_clear_errors_and_skip_reason() -> None:
    train, head = random_problem()
    det = fitted(train, head, principal_dim=3)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        det(ForwardOutputs(torch.zeros(2, 4), train[:2, :5]))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        det(ForwardOutputs(torch.zeros(2, 3), train[:2]))
    bad = train[:3].clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(ForwardOutputs(torch.zeros(3, 4), bad))
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(ForwardOutputs(torch.full((3, 4), float("nan")), train[:3]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        fitted(bad, head)
    with pytest.raises(ValueError, match="no training features"):
        fitted(torch.zeros(0, 8), head)
    with pytest.raises(RuntimeError, match="fit"):
        unfitted = VirtualLogitMatching()
        unfitted.attach(head)
        unfitted(out(head, train[:2]))
    reason = VirtualLogitMatching().skip_reason(IsoMaxPlusHead(8, 4))
    assert reason is not None and "weight" in reason
    with pytest.raises(ValueError, match="weight"):
        VirtualLogitMatching().attach(IsoMaxPlusHead(8, 4))
    with pytest.raises(ValueError, match="< D = 8"):
        VirtualLogitMatching(principal_dim=8).attach(head)
    with pytest.raises(ValueError, match=">= 0"):
        VirtualLogitMatching(principal_dim=-1)
