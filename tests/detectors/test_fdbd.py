"""fDBD (Liu & Qin, ICML 2024): hand-computed 2-class example, an independent per-pair
numpy computation, fit over chunks and ranks, state, export."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ood.deploy.program import ScoreProbe
from lightning_ood.detectors import fdbd as fdbd_module
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.fdbd import FDBD, inverse_boundary_norms
from lightning_ood.detectors.registry import build_detector
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead
from tests.detectors.helpers import axis_head, clusters, head_outputs, linear_head


def _fitted(head: nn.Module, train: torch.Tensor, **kw) -> FDBD:
    det = FDBD(**kw)
    det.attach(head)
    det.fit(FitData(features=train))
    return det


# ----------------------------------------------------------------------------- math
def test_hand_computed_two_classes_in_2d() -> None:
    # w0 = (1,0), w1 = (0,1), b = (0, 0.5): the boundary is x - y - 0.5 = 0, ||w0 - w1|| = sqrt2
    head = linear_head([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.5])
    det = _fitted(head, torch.tensor([[1.0, 1.0], [3.0, 3.0]]))  # mu = (2, 2)
    torch.testing.assert_close(det.train_mean, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(det.inverse_norms, torch.tensor([[0.0, 1 / math.sqrt(2)], [1 / math.sqrt(2), 0.0]]))
    features = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    # (3,1): class 0, boundary distance |3 - 1 - 0.5| / sqrt2, ||z - mu|| = ||(1,-1)|| = sqrt2 -> 0.75
    # (0,2): class 1, boundary distance |0 - 2 - 0.5| / sqrt2, ||z - mu|| = 2 -> 1.25 / sqrt2
    torch.testing.assert_close(det(head_outputs(head, features)), torch.tensor([0.75, 1.25 / math.sqrt(2)]))


def test_matches_an_independent_per_pair_computation() -> None:
    gen = torch.Generator().manual_seed(3)
    head = LinearHead(6, 5)
    train, test = torch.randn(40, 6, generator=gen), torch.randn(12, 6, generator=gen) * 2
    det = _fitted(head, train)
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    mu = train.double().numpy().mean(0)
    expected = []
    for z in test.double().numpy():
        c = int(np.argmax(w @ z + b))
        dists = [abs((w[c] - w[j]) @ z + b[c] - b[j]) / np.linalg.norm(w[c] - w[j]) for j in range(5) if j != c]
        expected.append(np.mean(dists) / np.linalg.norm(z - mu))
    np.testing.assert_allclose(det(head_outputs(head, test)).double().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_higher_is_id_and_degenerate_inputs() -> None:
    head = axis_head()
    det = _fitted(head, clusters(80, seed=0))
    ident, ood = det(head_outputs(head, clusters(40, seed=1))), det(head_outputs(head, clusters(40, seed=2, ood=True)))
    assert ident.min() > ood.max()
    mu = det.train_mean
    for features in (torch.zeros(3, 8), torch.full((3, 8), 7.0), torch.full((3, 8), 1e30),
                     mu.expand(3, 8).clone(), clusters(3, seed=4) * 1e30):
        scores = det(head_outputs(head, features))
        assert scores.shape == (3,) and bool(torch.isfinite(scores).all()) and bool((scores >= 0).all())
    assert det(head_outputs(head, torch.zeros(0, 8))).shape == (0,)
    # identical weight rows: no boundary between them, still finite
    twin = linear_head([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.0, 0.3, 0.0])
    twin_det = _fitted(twin, torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    assert twin_det.inverse_norms[0, 1] == 0 and twin_det.inverse_norms[1, 0] == 0
    assert bool(torch.isfinite(twin_det(head_outputs(twin, torch.randn(4, 2)))).all())

    out = head_outputs(head, clusters(4, seed=5))
    bad = out.features.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(ForwardOutputs(out.logits, bad))
    with pytest.raises(ValueError, match="NaN or infinite"):
        det(ForwardOutputs(out.logits.clone().fill_(float("inf")), out.features))
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        det(ForwardOutputs(out.logits, torch.zeros(4, 5)))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        det(ForwardOutputs(torch.zeros(4, 3), out.features))
    with pytest.raises(ValueError, match="B = 4"):
        det(ForwardOutputs(out.logits, torch.zeros(3, 8)))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        det.fit(FitData(features=torch.zeros(5, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        det.fit(FitData(features=bad))
    with pytest.raises(RuntimeError, match="fit"):
        unfitted = FDBD()
        unfitted.attach(head)
        unfitted(out)


def test_skip_reason_and_registry() -> None:
    reason = FDBD().skip_reason(IsoMaxPlusHead(8, 4))
    assert isinstance(reason, str) and "IsoMaxPlusHead" in reason and "\n" not in reason
    assert "2 classes" in FDBD().skip_reason(LinearHead(8, 1))
    assert FDBD().skip_reason(LinearHead(8, 4)) is None
    with pytest.raises(ValueError):
        FDBD().attach(IsoMaxPlusHead(8, 4))
    assert isinstance(build_detector("fdbd", "imagenet"), FDBD)
    # C = 1000: the (C, C) matrix is 4 MB of float32, and a non-persistent buffer
    big = inverse_boundary_norms(torch.randn(1000, 16))
    assert big.shape == (1000, 1000) and big.dtype == torch.float32 and bool((big.diagonal() == 0).all())


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

    monkeypatch.setattr(fdbd_module, "all_reduce", all_reduce)
    ranks, shards, errors = [FDBD(), FDBD()], [train[:20], train[20:]], []
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
def test_strict_state_dict_round_trip() -> None:
    head = axis_head()
    det = _fitted(head, clusters(50, seed=0))
    assert set(det.state_dict()) == {"fitted", "train_mean", "num_fit_images"}
    fresh = FDBD()
    fresh.attach(head)
    fresh.load_state_dict(det.state_dict(), strict=True)
    out = head_outputs(head, clusters(9, seed=6))
    assert torch.equal(fresh(out), det(out))
    with pytest.raises(ValueError, match="does not match"):
        fresh.attach(LinearHead(5, 4))


# ----------------------------------------------------------------------------- export
def test_export_with_dynamic_batch_matches_eager() -> None:
    head = axis_head()
    det = _fitted(head, clusters(50, seed=0))
    batch = torch.export.Dim("batch", min=1)
    example = head_outputs(head, clusters(5, seed=7))
    program = torch.export.export(ScoreProbe(det), (example.logits, example.features),
                                  dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    out = head_outputs(head, torch.cat([clusters(6, seed=8), clusters(3, seed=9, ood=True)]))
    torch.testing.assert_close(program.module()(out.logits, out.features), det(out), atol=1e-6, rtol=1e-6)
