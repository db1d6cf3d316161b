"""Tests of the Mahalanobis detector (Lee et al., NeurIPS 2018; OpenOOD ``mds`` form) and of
the streamed Gaussian statistics in lightning_ood.detectors.gaussian."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim, export

from lightning_ood import distributed
from lightning_ood.detectors import gaussian
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.mahalanobis import Mahalanobis
from lightning_ood.detectors.registry import build_detector, entry
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead


# ----------------------------------------------------------------------------- helpers
def hand_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes in 2-D: class 0 around (0, 0), class 1 around (4, 0); the centred points
    of both are (+-1, 0) and (0, +-2), so Sigma = diag(0.5, 2) and P = diag(2, 0.5)."""
    offsets = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    features = torch.cat([offsets, offsets + torch.tensor([4.0, 0.0])])
    return features, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def random_problem(seed: int = 0, n: int = 120, dim: int = 5, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    means = torch.randn(classes, dim, generator=gen) * 3
    mixing = torch.randn(dim, dim, generator=gen)
    features = means[labels] + torch.randn(n, dim, generator=gen) @ mixing
    return features, labels


def fitted(features: torch.Tensor, labels: torch.Tensor, classes: int, **kw) -> Mahalanobis:
    det = Mahalanobis(**kw)
    det.attach(LinearHead(features.shape[1], classes))
    det.fit(FitData(features, labels=labels))
    return det


def numpy_mahalanobis(train: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: int) -> np.ndarray:
    """The authors' recipe: stack class-centred features, covariance with divisor N,
    pseudo-inverse, max over classes of minus the squared distance."""
    means = np.stack([train[labels == c].mean(0) for c in range(classes)])
    centred = np.concatenate([train[labels == c] - means[c] for c in range(classes)])
    precision = np.linalg.pinv(centred.T @ centred / len(train))
    dist = np.stack([np.einsum("bi,ij,bj->b", test - means[c], precision, test - means[c])
                     for c in range(classes)], axis=1)
    return -dist.min(axis=1)


def outputs(features: torch.Tensor, classes: int = 2) -> ForwardOutputs:
    return ForwardOutputs(torch.zeros(features.shape[0], classes), features)


class Probe(nn.Module):
    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.detector(ForwardOutputs(logits, features))


def fit_on_two_ranks(make, shards):
    """Fit one detector per simulated rank (threads) with a summing all_reduce."""
    barrier, inbox, local, errors = threading.Barrier(2), {}, threading.local(), []
    dets = [make() for _ in shards]

    def all_reduce(tensor, op="sum"):
        local.calls += 1
        inbox[(local.calls, local.rank)] = tensor.detach().clone()
        barrier.wait()
        parts = torch.stack([inbox[(local.calls, r)] for r in range(2)])
        return {"sum": parts.sum(0), "max": parts.amax(0), "min": parts.amin(0)}[op]

    def run(rank):
        local.rank, local.calls = rank, 0
        try:
            dets[rank].fit(shards[rank])
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
            barrier.abort()

    original = distributed.all_reduce
    distributed.all_reduce = all_reduce
    try:
        threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        distributed.all_reduce = original
    assert not errors, errors
    return dets


# ----------------------------------------------------------------------------- exact math
def test_hand_computed_closed_form() -> None:
    features, labels = hand_data()
    det = fitted(features, labels, 2)
    torch.testing.assert_close(det.means, torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(det.precision, torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(det.center, torch.tensor([2.0, 0.0], dtype=torch.float64))
    # (1, 2): MD_0 = 2*1 + 0.5*4 = 4, MD_1 = 2*9 + 0.5*4 = 20 -> -4
    # (3, 0): MD_0 = 18, MD_1 = 2 -> -2;   (2, 0): MD_0 = MD_1 = 8 -> -8
    test = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 0.0]])
    torch.testing.assert_close(det(outputs(test)), torch.tensor([-4.0, -2.0, -8.0]))
    assert int(det.n_train) == 8 and det.class_counts.tolist() == [4, 4]
    assert det.describe() == {"class": "Mahalanobis", "num_classes": 2, "feature_dim": 2, "n_train": 8}


def test_matches_independent_numpy_reference() -> None:
    train, labels = random_problem()
    test = random_problem(seed=1, n=17)[0]
    det = fitted(train, labels, 3, chunk_rows=13)
    expected = numpy_mahalanobis(train.double().numpy(), labels.numpy(), test.double().numpy(), 3)
    torch.testing.assert_close(det(outputs(test)).double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


def test_shared_helpers_add_up_over_shards() -> None:
    train, labels = random_problem()
    whole = gaussian.accumulate(gaussian.empty_sums(3, 5), train, labels)
    a = gaussian.accumulate(gaussian.empty_sums(3, 5), train[:50], labels[:50])
    b = gaussian.accumulate(gaussian.empty_sums(3, 5), train[50:], labels[50:])
    summed = a + b
    assert torch.equal(summed.counts, whole.counts)
    torch.testing.assert_close(summed.class_sums, whole.class_sums, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(summed.outer, whole.outer, rtol=1e-13, atol=1e-12)
    x, y = train.double().numpy(), labels.numpy()
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = np.concatenate([x[y == c] - means[c] for c in range(3)])
    torch.testing.assert_close(gaussian.class_means(summed), torch.from_numpy(means))
    torch.testing.assert_close(gaussian.tied_covariance(summed), torch.from_numpy(centred.T @ centred / 120))
    mean, cov = gaussian.pooled_moments(summed)
    torch.testing.assert_close(mean, torch.from_numpy(x.mean(0)))
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(x.T, bias=True)))


def test_stable_pinv() -> None:
    cov = torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(gaussian.stable_pinv(cov), torch.tensor([[0.25, 0.0], [0.0, 0.0]], dtype=torch.float64))
    # rounding-level eigenvalue relative to the raw second moment counts as zero
    noisy = torch.tensor([[1e-14, 0.0], [0.0, 1e-14]], dtype=torch.float64)
    assert torch.equal(gaussian.stable_pinv(noisy, scale=100.0), torch.zeros(2, 2, dtype=torch.float64))
    full = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(gaussian.stable_pinv(full), torch.linalg.inv(full))


# ----------------------------------------------------------------------------- behaviour
def test_higher_is_in_distribution() -> None:
    train, labels = random_problem(n=300)
    det = fitted(train, labels, 3)
    id_scores = det(outputs(random_problem(seed=2, n=50)[0], 3))
    ood_scores = det(outputs(random_problem(seed=2, n=50)[0] + 25.0, 3))
    assert bool((id_scores.median() > ood_scores.max()))


def test_works_with_isomax_plus_head_and_refuses_unknown_heads() -> None:
    features, labels = hand_data()
    det = Mahalanobis()
    assert det.skip_reason(IsoMaxPlusHead(2, 2)) is None
    det.attach(IsoMaxPlusHead(2, 2))
    det.fit(FitData(features, labels=labels))
    torch.testing.assert_close(det(outputs(torch.tensor([[1.0, 2.0]]))), torch.tensor([-4.0]))
    assert "number of classes" in Mahalanobis().skip_reason(nn.Identity())
    with pytest.raises(ValueError, match="number of classes"):
        Mahalanobis().attach(nn.Identity())


def test_class_without_samples_is_left_out() -> None:
    features, labels = hand_data()
    det = fitted(features, labels, 3)  # class 2 never seen: mean 0 but not a candidate
    assert det.class_counts.tolist() == [4, 4, 0]
    torch.testing.assert_close(det(outputs(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), 3)), torch.tensor([-4.0, -2.0]))


def test_chunked_and_two_rank_fits_equal_the_whole_fit() -> None:
    train, labels = random_problem()
    test = random_problem(seed=3, n=9)[0]
    whole = fitted(train, labels, 3, chunk_rows=10_000)
    chunked = fitted(train, labels, 3, chunk_rows=7)
    ranks = fit_on_two_ranks(lambda: _attached(3, 5), [FitData(train[:41], labels=labels[:41]),
                                                       FitData(train[41:], labels=labels[41:])])
    for other in (chunked, *ranks):
        for key, value in whole.state_dict().items():
            torch.testing.assert_close(other.state_dict()[key], value, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(other(outputs(test, 3)), whole(outputs(test, 3)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ranks[0](outputs(test, 3)), ranks[1](outputs(test, 3)), rtol=0, atol=0)


def _attached(classes: int, dim: int) -> Mahalanobis:
    det = Mahalanobis()
    det.attach(LinearHead(dim, classes))
    return det


def test_state_dict_round_trip_strict() -> None:
    train, labels = random_problem()
    det = fitted(train, labels, 3)
    assert set(det.state_dict()) == {"fitted", "means", "precision", "center", "class_counts", "n_train"}
    fresh = _attached(3, 5)
    with pytest.raises(RuntimeError, match="fit"):
        fresh(outputs(train[:2], 3))
    fresh.load_state_dict(det.state_dict(), strict=True)
    assert torch.equal(fresh(outputs(train[:20], 3)), det(outputs(train[:20], 3)))
    fresh.attach(LinearHead(5, 3))  # same shapes: the fit is kept
    assert bool(fresh.fitted) and torch.equal(fresh(outputs(train[:20], 3)), det(outputs(train[:20], 3)))


def test_torch_export_with_dynamic_batch() -> None:
    train, labels = random_problem()
    det = fitted(train, labels, 3)
    batch = Dim("batch", min=1)
    program = export(Probe(det), (torch.zeros(4, 3), train[:4]), dynamic_shapes=({0: batch}, {0: batch}),
                     strict=False)
    test = random_problem(seed=4, n=11)[0]
    torch.testing.assert_close(program.module()(torch.zeros(11, 3), test), det(outputs(test, 3)), rtol=1e-6, atol=1e-6)


def test_degenerate_inputs_stay_finite() -> None:
    train, labels = random_problem()
    det = fitted(train, labels, 3)
    for test in (torch.zeros(3, 5), torch.full((3, 5), 7.0), torch.full((3, 5), 1e30), torch.full((3, 5), -3e38)):
        assert bool(torch.isfinite(det(outputs(test, 3))).all())
    assert det(outputs(torch.zeros(0, 5), 3)).shape == (0,)
    # a fit on constant (and on zero) features: zero covariance, finite scores
    for value in (0.0, 3.0):
        const = fitted(torch.full((10, 5), value), torch.tensor([0, 1] * 5), 2)
        assert bool(torch.isfinite(const(outputs(train[:4]))).all())
        assert torch.equal(const.precision, torch.zeros(5, 5, dtype=torch.float64))


def test_clear_errors() -> None:
    train, labels = random_problem()
    det = fitted(train, labels, 3)
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        det(outputs(train[:, :4], 3))
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        det(outputs(train[0], 3))
    bad = train[:4].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(outputs(bad, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        _attached(3, 5).fit(FitData(bad, labels=labels[:4]))
    with pytest.raises(ValueError, match="labels"):
        _attached(3, 5).fit(FitData(train))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        _attached(3, 5).fit(FitData(train, labels=labels + 1))
    with pytest.raises(ValueError, match="integer"):
        _attached(3, 5).fit(FitData(train, labels=labels.float()))
    with pytest.raises(ValueError, match="no training features"):
        _attached(3, 5).fit(FitData(torch.zeros(0, 5), labels=torch.zeros(0, dtype=torch.long)))
    with pytest.raises(RuntimeError, match="attach"):
        Mahalanobis().fit(FitData(train, labels=labels))
    with pytest.raises(ValueError, match="chunk_rows"):
        Mahalanobis(chunk_rows=0)


def test_registry_entry_and_flags() -> None:
    det = build_detector("mahalanobis", "imagenet")
    assert isinstance(det, Mahalanobis) and det.requires_labels and det.requires_fit
    assert entry("mahalanobis").cls is Mahalanobis
    assert not det.tuning_grid and det.reads == ("features",)
