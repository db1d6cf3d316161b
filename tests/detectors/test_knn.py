"""KNN (Sun et al., ICML 2022): hand-computed distances, brute-force parity of the chunked
running top-k, bank fitting (chunks, ranks, max_bank), state, export and tuning."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from lightning_ood.deploy.program import ScoreProbe
from lightning_ood.detectors import knn as knn_module
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.knn import KNN, kth_smallest_sq_distance, unit_rows
from lightning_ood.detectors.registry import build_detector
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead
from lightning_ood.evaluation.tuning import TuningData, tune_detector
from tests.detectors.helpers import clusters


def _out(features: torch.Tensor, classes: int = 3) -> ForwardOutputs:
    return ForwardOutputs(logits=torch.zeros(features.shape[0], classes), features=features)


def _fitted(k: int = 5, n: int = 60, **kw) -> KNN:
    det = KNN(k=k, **kw)
    det.attach(LinearHead(8, 4))
    det.fit(FitData(features=clusters(n, seed=0)))
    return det


# ----------------------------------------------------------------------------- math
def test_hand_computed_four_point_bank() -> None:
    # bank directions (1,0), (0,1), (-1,0), (0,-1), given at different lengths
    bank = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-3.0, 0.0], [0.0, -0.5]])
    det = KNN(k=2)
    det.fit(FitData(features=bank))
    torch.testing.assert_close(det.bank, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    queries = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # (1,0): distances 0, sqrt2, 2, sqrt2 -> 2nd nearest sqrt2
    # (0.6,0.8): squared distances 0.8, 0.4, 3.2, 3.6 -> 2nd nearest sqrt(0.8)
    torch.testing.assert_close(det(_out(queries)), torch.tensor([-math.sqrt(2.0), -math.sqrt(0.8)]))
    det.k = 1
    torch.testing.assert_close(det(_out(queries)), torch.tensor([0.0, -math.sqrt(0.4)]), atol=1e-6, rtol=0)
    det.k = 4
    torch.testing.assert_close(det(_out(queries)), torch.tensor([-2.0, -math.sqrt(3.6)]))


@pytest.mark.parametrize("k, chunk", [(1, 16), (7, 16), (50, 16), (7, 1), (64, 1000), (200, 33)])
def test_chunked_running_topk_equals_brute_force(k: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(k + chunk)
    bank = unit_rows(torch.randn(200, 8, generator=gen))
    queries = unit_rows(torch.randn(30, 8, generator=gen))
    got = kth_smallest_sq_distance(queries, bank, k, chunk).sqrt()
    # independent: full float64 pairwise distances in numpy, sorted
    q, b = queries.double().numpy(), bank.double().numpy()
    full = np.sqrt(((q[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    expected = np.sort(full, axis=1)[:, k - 1]
    np.testing.assert_allclose(got.double().numpy(), expected, atol=2e-4, rtol=1e-5)
    # the detector with that chunking gives the same
    det = KNN(k=k, bank_chunk=chunk)
    det.fit(FitData(features=bank * 3.0))
    np.testing.assert_allclose(det(_out(queries * 0.5)).double().numpy(), -expected, atol=2e-4, rtol=1e-5)


def test_higher_is_id_and_degenerate_inputs() -> None:
    det = _fitted()
    ident, ood = det(_out(clusters(40, seed=1))), det(_out(clusters(40, seed=2, ood=True)))
    assert ident.min() > ood.max()
    assert bool((det(_out(clusters(40, seed=1))) <= 0).all())
    for features in (torch.zeros(3, 8), torch.full((3, 8), 7.0), torch.full((3, 8), 1e30),
                     torch.full((3, 8), -1e-30), clusters(3, seed=4) * 1e35):
        scores = det(_out(features))
        assert scores.shape == (3,) and bool(torch.isfinite(scores).all())
    torch.testing.assert_close(det(_out(torch.zeros(2, 8))), torch.full((2,), -1.0))  # zero row: distance 1
    assert det(_out(torch.zeros(0, 8))).shape == (0,)
    bad = clusters(4, seed=5)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(_out(bad))
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        det(_out(torch.zeros(2, 5)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        KNN(k=1).fit(FitData(features=torch.zeros(4)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        KNN(k=1).fit(FitData(features=bad))
    with pytest.raises(RuntimeError, match="fit"):
        unfitted = KNN(k=1)
        unfitted.attach(LinearHead(8, 4))
        unfitted(_out(torch.zeros(2, 8)))


def test_k_checks_and_bank_limits() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            KNN(k=bad)
    with pytest.raises(ValueError, match="exceeds the bank of 60"):
        _fitted(k=61)
    det = _fitted(k=60)
    assert det.bank_size == 60 and int(det.num_fit_images) == 60
    with pytest.raises(ValueError, match="exceeds the bank"):
        det.set_hyperparameters(k=61)
    assert det.set_hyperparameters(k=3) is False and det.k == 3 and int(det.neighbours) == 3
    capped = _fitted(k=5, max_bank=25)
    assert capped.bank.shape == (25, 8) and int(capped.num_fit_images) == 60
    # a deterministic subset of the normalised rows
    full = _fitted(k=5)
    again = _fitted(k=5, max_bank=25)
    assert torch.equal(capped.bank, again.bank)
    rows = {tuple(r) for r in full.bank.tolist()}
    assert all(tuple(r) in rows for r in capped.bank.tolist())
    with pytest.raises(ValueError, match="exceeds the bank of 25"):
        _fitted(k=26, max_bank=25)
    assert capped.skip_reason(IsoMaxPlusHead(8, 4)) is None
    assert build_detector("knn", "cifar10").k == 50 and build_detector("knn", "imagenet").k == 1000
    assert build_detector("deep_knn").k == 50


# ----------------------------------------------------------------------------- fit
def test_chunked_fit_equals_whole_fit() -> None:
    train = clusters(57, seed=0)
    whole, chunked = KNN(k=5, fit_chunk=4096), KNN(k=5, fit_chunk=7)
    whole.fit(FitData(features=train))
    chunked.fit(FitData(features=train))
    assert torch.equal(whole.bank, chunked.bank)
    queries = clusters(9, seed=3)
    assert torch.equal(whole(_out(queries)), chunked(_out(queries)))


def test_two_ranks_gather_the_one_process_bank(monkeypatch: pytest.MonkeyPatch) -> None:
    train = clusters(57, seed=0)
    reference = KNN(k=5)
    reference.fit(FitData(features=train))
    barrier, inbox, local = threading.Barrier(2), {}, threading.local()

    def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
        inbox[local.rank] = tensor.detach().clone()
        barrier.wait()
        return torch.cat([inbox[0], inbox[1]])

    monkeypatch.setattr(knn_module, "all_gather_rows", all_gather_rows)
    ranks, shards, errors = [KNN(k=5), KNN(k=5)], [train[:20], train[20:]], []

    def run(rank: int) -> None:
        local.rank = rank
        try:
            ranks[rank].fit(FitData(features=shards[rank]))
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    queries = clusters(9, seed=3)
    for det in ranks:
        assert torch.equal(det.bank, reference.bank)
        assert int(det.num_fit_images) == 57
        assert torch.equal(det(_out(queries)), reference(_out(queries)))


# ----------------------------------------------------------------------------- state
def test_strict_state_dict_round_trip_resizes_the_bank() -> None:
    det = _fitted(k=7)
    assert set(det.state_dict()) == {"fitted", "neighbours", "num_fit_images", "bank"}
    queries = clusters(11, seed=6)
    for attach in (True, False):
        fresh = KNN(k=50)
        if attach:
            fresh.attach(LinearHead(8, 4))
            assert fresh.bank.shape == (0, 8)
        fresh.load_state_dict(det.state_dict(), strict=True)
        assert fresh.k == 7 and fresh.bank.shape == (60, 8)
        assert torch.equal(fresh(_out(queries)), det(_out(queries)))
        fresh.attach(LinearHead(8, 4))  # attaching after loading keeps the fit
        assert torch.equal(fresh(_out(queries)), det(_out(queries)))


# ----------------------------------------------------------------------------- export
def test_export_with_dynamic_batch_matches_eager() -> None:
    det = _fitted(k=7, n=60, bank_chunk=16)  # 4 bank chunks: a Python loop over static sizes
    batch = torch.export.Dim("batch", min=1)
    example = clusters(5, seed=7)
    program = torch.export.export(ScoreProbe(det), (torch.zeros(5, 4), example),
                                  dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    queries = torch.cat([clusters(6, seed=8), clusters(3, seed=9, ood=True)])
    got = program.module()(torch.zeros(9, 4), queries)
    torch.testing.assert_close(got, det(_out(queries, 4)), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- tuning
def test_tuning_skips_k_above_the_bank_and_returns_the_best() -> None:
    fit = FitData(features=clusters(30, seed=0))  # 4 clusters of ~7 rows
    det = KNN(k=20)
    det.attach(LinearHead(8, 4))
    det.fit(fit)
    assert [c["k"] for c in det.tuning_candidates()] == [1, 10, 20]
    assert [c["k"] for c in det.tuning_candidates({"k": (1, 5, 31, 500)})] == [1, 5, 20]
    # OOD: one point roughly equidistant from every cluster; k = 20 exceeds a cluster and
    # reaches the other clusters, so it ranks ID below OOD; k = 1 separates them
    ood = clusters(40, seed=2, ood=True) * 0.2 + 0.6
    data = TuningData(_out(clusters(40, seed=1), 4), _out(ood, 4), "jigsaw", "synthetic")
    result = tune_detector(det, data, fit)
    assert result is not None and result["default"] == {"k": 20}
    aurocs = {row["k"]: row["auroc"] for row in result["grid"]}
    assert set(aurocs) == {1, 10, 20}
    assert result["parameters"] == {"k": 1} and aurocs[1] == max(aurocs.values()) > aurocs[20]
    assert det.k == 1 and int(det.neighbours) == 1
