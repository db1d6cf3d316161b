"""NCI (Liu & Qin, CVPR 2025): hand-computed example, an independent numpy computation, fit
over chunks and ranks, state, export and tuning of alpha."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ood.deploy.program import ScoreProbe
from lightning_ood.detectors import fdbd as fdbd_module
from lightning_ood.detectors import nci as nci_module
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.nci import ALPHA_GRID, NCI
from lightning_ood.detectors.registry import build_detector

from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead
from lightning_ood.evaluation.tuning import TuningData, tune_detector
from tests.detectors.helpers import axis_head, clusters, head_outputs, linear_head


def _fitted(head: nn.Module, train: torch.Tensor, **kw) -> NCI:
    det = NCI(**kw)
    det.attach(head)
    det.fit(FitData(features=train))
    return det


# ----------------------------------------------------------------------------- math
def test_hand_computed_example() -> None:
    head = linear_head([[1.0, 0.0], [0.0, 2.0]], [0.0, 0.0])
    det = _fitted(head, torch.tensor([[1.0, 1.0], [3.0, 3.0]]), alpha=0.1)  # mu = (2, 2)
    features = torch.tensor([[5.0, 6.0], [4.0, 1.0], [2.0, 2.0]])
    # (5,6): logits (5,12), c = 1; z - mu = (3,4), unit (0.6,0.8); w1 . unit = 1.6; 0.1 * |z|_1 = 1.1
    # (4,1): logits (4,2), c = 0; z - mu = (2,-1), unit (2,-1)/sqrt5; w0 . unit = 2/sqrt5; 0.1 * 5
    # (2,2) = mu: no direction, alignment 0; 0.1 * 4
    expected = torch.tensor([1.6 + 1.1, 2 / math.sqrt(5) + 0.5, 0.4])
    torch.testing.assert_close(det(head_outputs(head, features)), expected)
    det.alpha = 0.0
    torch.testing.assert_close(det(head_outputs(head, features)), torch.tensor([1.6, 2 / math.sqrt(5), 0.0]))


def test_matches_an_independent_computation() -> None:
    gen = torch.Generator().manual_seed(3)
    head = LinearHead(6, 5)
    train, test = torch.randn(40, 6, generator=gen), torch.randn(12, 6, generator=gen) * 2
    det = _fitted(head, train, alpha=0.01)
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    mu = train.double().numpy().mean(0)
    expected = []
    for z in test.double().numpy():
        c = int(np.argmax(w @ z + b))
        expected.append(w[c] @ (z - mu) / np.linalg.norm(z - mu) + 0.01 * np.abs(z).sum())
    np.testing.assert_allclose(det(head_outputs(head, test)).double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_matmul_and_gathered_rows_give_the_same_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(4)
    head = LinearHead(16, 7)
    det = _fitted(head, torch.randn(50, 16, generator=gen), alpha=0.01)
    outputs = head_outputs(head, torch.randn(30, 16, generator=gen) * 3)
    by_matmul = det(outputs)  # 7 classes: the matmul branch
    monkeypatch.setattr(nci_module, "DOT_BY_MATMUL_MAX_CLASSES", 0)
    torch.testing.assert_close(det(outputs), by_matmul, rtol=1e-6, atol=1e-6)


def test_higher_is_id_and_degenerate_inputs() -> None:
    head = axis_head()
    det = _fitted(head, clusters(80, seed=0))
    ident, ood = det(head_outputs(head, clusters(40, seed=1))), det(head_outputs(head, clusters(40, seed=2, ood=True)))
    assert ident.min() > ood.max()
    for features in (torch.zeros(3, 8), torch.full((3, 8), 7.0), torch.full((3, 8), 1e30),
                     det.train_mean.expand(3, 8).clone(), clusters(3, seed=4) * 1e30):
        scores = det(head_outputs(head, features))
        assert scores.shape == (3,) and bool(torch.isfinite(scores).all())
    assert det(head_outputs(head, torch.zeros(0, 8))).shape == (0,)

    out = head_outputs(head, clusters(4, seed=5))
    bad = out.features.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(ForwardOutputs(out.logits, bad))
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        det(ForwardOutputs(out.logits, torch.zeros(4, 5)))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        det(ForwardOutputs(torch.zeros(4, 3), out.features))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        det.fit(FitData(features=torch.zeros(5, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        det.fit(FitData(features=bad))
    for alpha in (-1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="alpha"):
            NCI(alpha=alpha)
    with pytest.raises(RuntimeError, match="fit"):
        unfitted = NCI()
        unfitted.attach(head)
        unfitted(out)


def test_skip_reason_and_registry() -> None:
    reason = NCI().skip_reason(IsoMaxPlusHead(8, 4))
    assert isinstance(reason, str) and "IsoMaxPlusHead" in reason and "\n" not in reason
    assert NCI().skip_reason(LinearHead(8, 4)) is None
    with pytest.raises(ValueError):
        NCI().attach(IsoMaxPlusHead(8, 4))
    for family in ("cifar10", "cifar100", "imagenet"):
        assert build_detector("nci", family).alpha == 1e-4
    assert 1e-4 in ALPHA_GRID


# ----------------------------------------------------------------------------- fit
def test_chunked_fit_equals_whole_fit_and_two_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    head = axis_head()
    train = clusters(57, seed=0)
    whole, chunked = _fitted(head, train, fit_chunk=4096), _fitted(head, train, fit_chunk=5)
    torch.testing.assert_close(whole.train_mean, chunked.train_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(whole.train_mean.double(), train.double().mean(0), rtol=0, atol=1e-6)

    barrier, inbox, local = threading.Barrier(2), {}, threading.local()

    def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        local.calls += 1
        inbox[(local.calls, local.rank)] = tensor.detach().clone()
        barrier.wait()
        assert op == "sum"
        return inbox[(local.calls, 0)] + inbox[(local.calls, 1)]

    monkeypatch.setattr(fdbd_module, "all_reduce", all_reduce)  # NCI shares fdbd's training_mean
    ranks, shards, errors = [NCI(), NCI()], [train[:20], train[20:]], []
    for det in ranks:
        det.attach(head)

    def run(rank: int) -> None:
        local.rank, local.calls = rank, 0
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
    for det in ranks:
        torch.testing.assert_close(det.train_mean, whole.train_mean, rtol=0, atol=1e-7)
        assert int(det.num_fit_images) == 57


# ----------------------------------------------------------------------------- state
def test_strict_state_dict_round_trip_carries_alpha() -> None:
    head = axis_head()
    det = _fitted(head, clusters(50, seed=0), alpha=0.01)
    assert set(det.state_dict()) == {"fitted", "alpha_value", "train_mean", "num_fit_images"}
    fresh = NCI(alpha=0.5)
    fresh.attach(head)
    fresh.load_state_dict(det.state_dict(), strict=True)
    assert fresh.alpha == 0.01
    out = head_outputs(head, clusters(9, seed=6))
    assert torch.equal(fresh(out), det(out))
    assert all(not k.startswith("_head") for k in fresh.state_dict())


# ----------------------------------------------------------------------------- export
def test_export_with_dynamic_batch_matches_eager() -> None:
    head = axis_head()
    det = _fitted(head, clusters(50, seed=0), alpha=0.01)
    batch = torch.export.Dim("batch", min=1)
    example = head_outputs(head, clusters(5, seed=7))
    program = torch.export.export(ScoreProbe(det), (example.logits, example.features),
                                  dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    out = head_outputs(head, torch.cat([clusters(6, seed=8), clusters(3, seed=9, ood=True)]))
    torch.testing.assert_close(program.module()(out.logits, out.features), det(out), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- tuning
def test_tuning_alpha_returns_the_best() -> None:
    head = axis_head()
    fit = FitData(features=clusters(50, seed=0))
    det = _fitted(head, fit.features)
    # OOD: the ID features pulled half-way to mu -- same centred direction (same alignment),
    # smaller L1 norm, so only a large enough alpha separates them
    ident = clusters(40, seed=1)
    ood = det.train_mean + 0.5 * (ident - det.train_mean)
    data = TuningData(head_outputs(head, ident), head_outputs(head, ood), "jigsaw", "synthetic")
    result = tune_detector(det, data, fit)
    assert result is not None and result["default"] == {"alpha": 1e-4}
    assert {row["alpha"] for row in result["grid"]} == set(ALPHA_GRID)
    aurocs = {row["alpha"]: row["auroc"] for row in result["grid"]}
    assert result["parameters"] == {"alpha": 0.1} and aurocs[0.1] == max(aurocs.values()) > aurocs[1e-4]
    assert det.alpha == 0.1 and float(det.alpha_value) == 0.1
    assert det.set_hyperparameters(alpha=0.01) is False
