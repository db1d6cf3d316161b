"""NCI (Liu & Qin, CVPR 2025): hand-computed example, an independent numpy computation, fit
over chunks and ranks, state, export and tuning of alpha."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ood.detectors import fdbd as fdbd_module
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.nci import ALPHA_GRID, NCI
from lightning_ood.detectors.registry import build_detector

from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead
from lightning_ood.evaluation.tuning import TuningData, tune_detector


def _head(weight: list[list[float]], bias: list[float]) -> LinearHead:
    head = LinearHead(len(weight[0]), len(weight))
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
        head.bias.copy_(torch.tensor(bias))
    return head


def _out(head: nn.Module, features: torch.Tensor) -> ForwardOutputs:
    with torch.no_grad():
        return ForwardOutputs(logits=head(features), features=features)


def _clusters(n: int, seed: int, dim: int = 8, classes: int = 4, ood: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    axes = torch.randint(classes, dim, (n,), generator=gen) if ood else torch.randint(0, classes, (n,), generator=gen)
    return 3.0 * torch.eye(dim)[axes] + 0.3 * torch.randn(n, dim, generator=gen)


def _axis_head(seed: int = 0) -> LinearHead:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.cat([torch.eye(4), torch.zeros(4, 4)], dim=1) + 0.05 * torch.randn(4, 8, generator=gen)
    return _head(weight.tolist(), (0.1 * torch.randn(4, generator=gen)).tolist())


def _fitted(head: nn.Module, train: torch.Tensor, **kw) -> NCI:
    det = NCI(**kw)
    det.attach(head)
    det.fit(FitData(features=train))
    return det


# ----------------------------------------------------------------------------- math
def test_hand_computed_example() -> None:
    head = _head([[1.0, 0.0], [0.0, 2.0]], [0.0, 0.0])
    det = _fitted(head, torch.tensor([[1.0, 1.0], [3.0, 3.0]]), alpha=0.1)  # mu = (2, 2)
    features = torch.tensor([[5.0, 6.0], [4.0, 1.0], [2.0, 2.0]])
    # (5,6): logits (5,12), c = 1; z - mu = (3,4), unit (0.6,0.8); w1 . unit = 1.6; 0.1 * |z|_1 = 1.1
    # (4,1): logits (4,2), c = 0; z - mu = (2,-1), unit (2,-1)/sqrt5; w0 . unit = 2/sqrt5; 0.1 * 5
    # (2,2) = mu: no direction, alignment 0; 0.1 * 4
    expected = torch.tensor([1.6 + 1.1, 2 / math.sqrt(5) + 0.5, 0.4])
    torch.testing.assert_close(det(_out(head, features)), expected)
    det.alpha = 0.0
    torch.testing.assert_close(det(_out(head, features)), torch.tensor([1.6, 2 / math.sqrt(5), 0.0]))


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
    np.testing.assert_allclose(det(_out(head, test)).double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_higher_is_id_and_degenerate_inputs() -> None:
    head = _axis_head()
    det = _fitted(head, _clusters(80, seed=0))
    ident, ood = det(_out(head, _clusters(40, seed=1))), det(_out(head, _clusters(40, seed=2, ood=True)))
    assert ident.min() > ood.max()
    for features in (torch.zeros(3, 8), torch.full((3, 8), 7.0), torch.full((3, 8), 1e30),
                     det.train_mean.expand(3, 8).clone(), _clusters(3, seed=4) * 1e30):
        scores = det(_out(head, features))
        assert scores.shape == (3,) and bool(torch.isfinite(scores).all())
    assert det(_out(head, torch.zeros(0, 8))).shape == (0,)

    out = _out(head, _clusters(4, seed=5))
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
    head = _axis_head()
    train = _clusters(57, seed=0)
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
    head = _axis_head()
    det = _fitted(head, _clusters(50, seed=0), alpha=0.01)
    assert set(det.state_dict()) == {"fitted", "alpha_value", "train_mean", "num_fit_images"}
    fresh = NCI(alpha=0.5)
    fresh.attach(head)
    fresh.load_state_dict(det.state_dict(), strict=True)
    assert fresh.alpha == 0.01
    out = _out(head, _clusters(9, seed=6))
    assert torch.equal(fresh(out), det(out))
    assert all(not k.startswith("_head") for k in fresh.state_dict())


# ----------------------------------------------------------------------------- export
class _Probe(nn.Module):
    def __init__(self, detector: NCI, head: nn.Module) -> None:
        super().__init__()
        self.detector, self.head = detector, head

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.detector(ForwardOutputs(logits, features))


def test_export_with_dynamic_batch_matches_eager() -> None:
    head = _axis_head()
    det = _fitted(head, _clusters(50, seed=0), alpha=0.01)
    batch = torch.export.Dim("batch", min=1)
    example = _out(head, _clusters(5, seed=7))
    program = torch.export.export(_Probe(det, head), (example.logits, example.features),
                                  dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    out = _out(head, torch.cat([_clusters(6, seed=8), _clusters(3, seed=9, ood=True)]))
    torch.testing.assert_close(program.module()(out.logits, out.features), det(out), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- tuning
def test_tuning_alpha_returns_the_best() -> None:
    head = _axis_head()
    fit = FitData(features=_clusters(50, seed=0))
    det = _fitted(head, fit.features)
    # OOD: the ID features pulled half-way to mu -- same centred direction (same alignment),
    # smaller L1 norm, so only a large enough alpha separates them
    ident = _clusters(40, seed=1)
    ood = det.train_mean + 0.5 * (ident - det.train_mean)
    data = TuningData(_out(head, ident), _out(head, ood), "jigsaw", "synthetic")
    result = tune_detector(det, data, fit)
    assert result is not None and result["default"] == {"alpha": 1e-4}
    assert {row["alpha"] for row in result["grid"]} == set(ALPHA_GRID)
    aurocs = {row["alpha"]: row["auroc"] for row in result["grid"]}
    assert result["parameters"] == {"alpha": 0.1} and aurocs[0.1] == max(aurocs.values()) > aurocs[1e-4]
    assert det.alpha == 0.1 and float(det.alpha_value) == 0.1
    assert det.set_hyperparameters(alpha=0.01) is False
