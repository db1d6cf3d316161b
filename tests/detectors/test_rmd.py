"""Tests of the Relative Mahalanobis Distance detector (Ren et al., arXiv:2106.09022)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.export import Dim, export

from lightning_ood.detectors.base import FitData
from lightning_ood.detectors.mahalanobis import Mahalanobis
from lightning_ood.detectors.registry import build_detector, canonical_name
from lightning_ood.detectors.rmd import RelativeMahalanobis
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead
from tests.detectors.test_mahalanobis import (
    Probe, fit_on_two_ranks, hand_data, numpy_mahalanobis, outputs, random_problem,
)


def fitted(features: torch.Tensor, labels: torch.Tensor, classes: int, cls=RelativeMahalanobis, **kw):
    det = cls(**kw)
    det.attach(LinearHead(features.shape[1], classes))
    det.fit(FitData(features, labels=labels))
    return det


def attached(classes: int = 3, dim: int = 5) -> RelativeMahalanobis:
    det = RelativeMahalanobis()
    det.attach(LinearHead(dim, classes))
    return det


def numpy_rmd(train: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: int) -> np.ndarray:
    """-min_c (MD_c - MD_0): class Gaussians with the tied covariance, background Gaussian of
    all training features (mean, covariance with divisor N, pseudo-inverse)."""
    mean0 = train.mean(0)
    prec0 = np.linalg.pinv((train - mean0).T @ (train - mean0) / len(train))
    md0 = np.einsum("bi,ij,bj->b", test - mean0, prec0, test - mean0)
    # numpy_mahalanobis returns -min_c MD_c
    return numpy_mahalanobis(train, labels, test, classes) + md0


def test_hand_computed_closed_form() -> None:
    features, labels = hand_data()
    det = fitted(features, labels, 2)
    # background: mean (2, 0); x deviations -1,-3,-2,-2,3,1,2,2 -> var 36/8 = 4.5; y var 16/8 = 2
    torch.testing.assert_close(det.background_precision,
                               torch.tensor([[2.0 / 9.0, 0.0], [0.0, 0.5]], dtype=torch.float64))
    # (1, 2): MD = (4, 20), MD_0 = 2/9 + 2 = 20/9 -> -(4 - 20/9) = -16/9
    # (3, 0): MD = (18, 2), MD_0 = 2/9 -> -(2 - 2/9) = -16/9;  (2, 0): MD = (8, 8), MD_0 = 0 -> -8
    test = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 0.0]])
    torch.testing.assert_close(det(outputs(test)), torch.tensor([-16.0 / 9.0, -16.0 / 9.0, -8.0]))


def test_matches_independent_numpy_reference_and_mahalanobis_relation() -> None:
    train, labels = random_problem()
    test = random_problem(seed=1, n=17)[0]
    det = fitted(train, labels, 3, chunk_rows=11)
    expected = numpy_rmd(train.double().numpy(), labels.numpy(), test.double().numpy(), 3)
    torch.testing.assert_close(det(outputs(test, 3)).double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    maha = fitted(train, labels, 3, cls=Mahalanobis)
    for key, value in maha.state_dict().items():
        torch.testing.assert_close(det.state_dict()[key], value)


def test_higher_is_in_distribution() -> None:
    train, labels = random_problem(n=300)
    det = fitted(train, labels, 3)
    id_scores = det(outputs(random_problem(seed=2, n=50)[0], 3))
    ood_scores = det(outputs(random_problem(seed=2, n=50)[0] * 6.0 + 20.0, 3))
    # RMD discounts what is also far from the background Gaussian, so no strict separation
    # of every pair is expected; the AUROC (fraction of ID > OOD pairs) must still be high
    auroc = (id_scores.unsqueeze(1) > ood_scores.unsqueeze(0)).float().mean()
    assert float(auroc) > 0.9 and bool(id_scores.median() > ood_scores.median())


def test_chunked_and_two_rank_fits_equal_the_whole_fit() -> None:
    train, labels = random_problem()
    test = random_problem(seed=3, n=9)[0]
    whole = fitted(train, labels, 3, chunk_rows=10_000)
    chunked = fitted(train, labels, 3, chunk_rows=4)
    ranks = fit_on_two_ranks(attached, [FitData(train[:70], labels=labels[:70]),
                                        FitData(train[70:], labels=labels[70:])])
    for other in (chunked, *ranks):
        for key, value in whole.state_dict().items():
            torch.testing.assert_close(other.state_dict()[key], value, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(other(outputs(test, 3)), whole(outputs(test, 3)), rtol=1e-6, atol=1e-5)


def test_state_dict_round_trip_and_export() -> None:
    train, labels = random_problem()
    det = fitted(train, labels, 3)
    assert set(det.state_dict()) == {"fitted", "means", "precision", "center", "class_counts", "n_train",
                                     "background_precision"}
    fresh = attached()
    fresh.load_state_dict(det.state_dict(), strict=True)
    assert torch.equal(fresh(outputs(train[:20], 3)), det(outputs(train[:20], 3)))
    batch = Dim("batch", min=1)
    program = export(Probe(det), (torch.zeros(4, 3), train[:4]), dynamic_shapes=({0: batch}, {0: batch}),
                     strict=False)
    test = random_problem(seed=4, n=13)[0]
    torch.testing.assert_close(program.module()(torch.zeros(13, 3), test), det(outputs(test, 3)), rtol=1e-6, atol=1e-6)


def test_degenerate_inputs_and_errors() -> None:
    train, labels = random_problem()
    det = fitted(train, labels, 3)
    for test in (torch.zeros(3, 5), torch.full((3, 5), -2.0), torch.full((3, 5), 1e30)):
        assert bool(torch.isfinite(det(outputs(test, 3))).all())
    const = fitted(torch.full((10, 5), 2.0), torch.tensor([0, 1] * 5), 2)
    assert bool(torch.isfinite(const(outputs(train[:4]))).all())
    bad = train[:3].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(outputs(bad, 3))
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        det(outputs(train[:, :2], 3))
    with pytest.raises(ValueError, match="labels"):
        attached().fit(FitData(train))


def test_registry_isomax_head_and_flags() -> None:
    assert canonical_name("rmds") == "rmd" and canonical_name("relative_mahalanobis") == "rmd"
    det = build_detector("rmd")
    assert isinstance(det, RelativeMahalanobis) and det.requires_labels and not det.tuning_grid
    features, labels = hand_data()
    det.attach(IsoMaxPlusHead(2, 2))
    det.fit(FitData(features, labels=labels))
    torch.testing.assert_close(det(outputs(torch.tensor([[2.0, 0.0]]))), torch.tensor([-8.0]))
