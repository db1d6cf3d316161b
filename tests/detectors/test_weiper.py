"""Tests of the WeiPer detector (Granz et al., NeurIPS 2024, arXiv:2405.17164)."""
from __future__ import annotations

import math
import threading
from bisect import bisect_right
from typing import Optional

import numpy as np
import pytest
import torch

from lightning_ood import distributed
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.weiper import (
    PRESETS,
    WeiPer,
    bin_counts,
    bin_indices,
    box_smoothing_matrix,
    perturbed_msp_sum,
    symmetric_kl,
)
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead


# --------------------------------------------------------------------------- reference
def _ref_histogram(values: np.ndarray, lo: float, hi: float, n_bins: int) -> list[float]:
    """Histogram of one vector: equal bins on [lo, hi], last bin closed, overflow dropped,
    divided by the number of values."""
    edges = [lo + k * (hi - lo) / n_bins for k in range(n_bins + 1)]
    counts = [0] * n_bins
    for v in values:
        k = n_bins - 1 if v == hi else bisect_right(edges, v) - 1
        if 0 <= k < n_bins:
            counts[k] += 1
    return [c / len(values) for c in counts]


def _ref_smooth(hist: list[float], width: int) -> list[float]:
    """Box filter, "same" length, replicate padding, PyTorch's left pad (width - 1) // 2."""
    left, n = (width - 1) // 2, len(hist)
    return [sum(hist[min(max(j - left + t, 0), n - 1)] for t in range(width)) / width
            for j in range(n)]


def _ref_sym_kl(train: list[float], test: list[float], eps: float) -> float:
    p = [x + eps for x in train]
    q = [x + eps for x in test]
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    return sum(a * math.log(a / b) for a, b in zip(p, q)) + sum(
        b * math.log(b / a) for a, b in zip(p, q))


def _ref_msp(logits: np.ndarray, n_repeats: int) -> float:
    classes = len(logits) // n_repeats
    total = 0.0
    for i in range(n_repeats):
        head = logits[i * classes:(i + 1) * classes]
        exp = np.exp(head - head.max())
        total += float((exp / exp.sum()).max())
    return total / n_repeats


def reference_weiper(train: np.ndarray, test: np.ndarray, w_tilde: np.ndarray,
                     b_tilde: np.ndarray, n_repeats: int, n_bins: int, s1: int, s2: int,
                     lambda1: float, lambda2: float, eps_z: float, eps_w: float) -> list[float]:
    """The authors' definition, one sample at a time, in float64."""
    train_w = [w_tilde @ z + b_tilde for z in train]
    z_lo, z_hi = float(train.min()), float(train.max())
    w_lo, w_hi = min(float(v.min()) for v in train_w), max(float(v.max()) for v in train_w)
    mean_z = np.mean([_ref_histogram(z, z_lo, z_hi, n_bins) for z in train], axis=0).tolist()
    mean_w = np.mean([_ref_histogram(v, w_lo, w_hi, n_bins) for v in train_w], axis=0).tolist()
    scores = []
    for z in test:
        logits = w_tilde @ z + b_tilde
        d_z = _ref_sym_kl(mean_z, _ref_smooth(_ref_histogram(z, z_lo, z_hi, n_bins), s1), eps_z)
        d_w = _ref_sym_kl(mean_w, _ref_smooth(_ref_histogram(logits, w_lo, w_hi, n_bins), s2),
                          eps_w)
        scores.append(-(d_z + lambda1 * d_w - lambda2 * _ref_msp(logits, n_repeats)))
    return scores


def _grid_problem(seed: int = 0):
    """Features on a 1/4 grid and an integer W~: every value is exact in float32 and, with a
    prime bin count, no value but the range ends sits on a bin edge."""
    gen = torch.Generator().manual_seed(seed)
    dim, classes, repeats = 24, 3, 6
    train = torch.randint(0, 13, (40, dim), generator=gen).float().div_(4)
    train[:, :4] = 0.0
    test = torch.randint(0, 13, (12, dim), generator=gen).float().div_(4)
    test[:3] *= 2  # partly beyond the training range: exercises the overflow bins
    w_tilde = torch.randint(-3, 4, (repeats * classes, dim), generator=gen).float()
    b_tilde = torch.randint(-2, 3, (classes,), generator=gen).float().repeat(repeats)
    return train, test, w_tilde, b_tilde, classes, repeats


def _small(weight: torch.Tensor, bias: Optional[torch.Tensor] = None, **kw) -> WeiPer:
    return WeiPer(weight, bias, **{"n_repeats": 5, "n_bins": 20, **kw})


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("s1,s2", [(4, 15), (5, 40), (1, 2)])
def test_scores_match_reference(s1: int, s2: int) -> None:
    train, test, w_tilde, b_tilde, classes, repeats = _grid_problem()
    n_bins = 97
    det = WeiPer(torch.zeros(classes, train.shape[1]), None, n_repeats=repeats, n_bins=n_bins,
                 lambda1=2.5, lambda2=0.1, smoothing=s1, smoothing_perturbed=s2, chunk_size=5)
    det.perturbed_weight.copy_(w_tilde)
    det.perturbed_bias.copy_(b_tilde)
    det.fit_features(train)
    for lo, hi in (det.z_range.tolist(), det.wz_range.tolist()):
        assert math.gcd(n_bins, round(4 * (hi - lo))) == 1  # precondition of _grid_problem
    expected = reference_weiper(train.double().numpy(), test.double().numpy(),
                                w_tilde.double().numpy(), b_tilde.double().numpy(), repeats,
                                n_bins, s1, s2, 2.5, 0.1, 0.01, 0.025)
    got = det.score_features(test)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- pieces
def test_hand_computed_histogram_smoothing_kl_msp() -> None:
    values = torch.tensor([[0.0, 0.7, 1.2, 1.6, 2.0, -1.0, 3.0],
                           [2.0, 2.0, 1.9, 0.1, 0.2, 0.3, 5.0]])
    counts = bin_counts(values, 0.0, 2.0, 4)  # bins [0,.5) [.5,1) [1,1.5) [1.5,2]
    assert counts.tolist() == [[1, 1, 1, 2], [3, 0, 0, 3]]
    a, b, c, d = 1.0, 2.0, 3.0, 4.0
    hist = torch.tensor([[a, b, c, d]])
    cases = {
        1: [a, b, c, d],
        2: [(a + b) / 2, (b + c) / 2, (c + d) / 2, d],  # pads 0 left, 1 right
        3: [(2 * a + b) / 3, (a + b + c) / 3, (b + c + d) / 3, (c + 2 * d) / 3],
        4: [(2 * a + b + c) / 4, (a + b + c + d) / 4, (b + c + 2 * d) / 4, (c + 3 * d) / 4],
    }
    for width, expected in cases.items():
        torch.testing.assert_close(hist @ box_smoothing_matrix(4, width), torch.tensor([expected]))
    kl = symmetric_kl(torch.tensor([0.5, 0.5]), torch.tensor([[0.25, 0.75]]), eps=0.0)
    torch.testing.assert_close(kl, torch.tensor([0.25 * math.log(3.0)]))
    logits = torch.tensor([[0.0, 0.0, math.log(3.0), 0.0]])  # two heads of two classes
    torch.testing.assert_close(perturbed_msp_sum(logits, 2), torch.tensor([0.5 + 0.75]))
    gen = torch.Generator().manual_seed(1)
    for classes in (4, 40):  # both reduction paths (small and large heads)
        logits = torch.randn(3, 5 * classes, generator=gen) * 3
        expected = torch.softmax(logits.view(3, 5, classes), dim=2).amax(dim=2).sum(dim=1)
        torch.testing.assert_close(perturbed_msp_sum(logits, classes), expected)


def test_bin_edges() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        lo, hi = sorted((torch.randn(2, generator=gen) * 10).tolist())
        if hi - lo < 1:
            continue
        span = hi - lo
        values = torch.tensor([lo, hi, lo - 1e-2 * span, hi + 1e-2 * span, lo + 0.505 * span])
        assert bin_indices(values, lo, hi, 100).tolist() == [0.0, 99.0, -1.0, 100.0, 50.0]
    values = torch.rand(10_000, generator=gen) * 7 - 2
    got = bin_indices(values, -2.0, 5.0, 70).long()
    exact = torch.floor((values.double() + 2) * 10).long().clamp(max=69)
    near_edge = ((values.double() + 2) * 10 - (values.double() + 2).mul(10).round()).abs() < 1e-4
    assert bool((got == exact)[~near_edge].all())
    assert bin_indices(torch.zeros(3), 0.0, 0.0, 10).tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- W~
def test_perturbations_deterministic_and_of_length_delta() -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 16, generator=gen), torch.randn(4, generator=gen)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = _small(weight, bias, delta=1.8, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    same, other = (_small(weight, bias, delta=1.8, seed=s).perturbed_weight for s in (7, 8))
    assert torch.equal(first.perturbed_weight, same)
    assert not torch.allclose(first.perturbed_weight, other)
    rows = first.perturbed_weight.view(5, 4, 16)
    torch.testing.assert_close((rows - weight).norm(dim=2), 1.8 * weight.norm(dim=1).expand(5, 4))
    assert torch.equal(first.perturbed_bias, bias.repeat(5))
    assert first.perturbed_weight.shape == (20, 16) and first.perturbed_bias.shape == (20,)


def test_attach_skip_reason_and_presets() -> None:
    head = LinearHead(16, 4)
    attached = _small(None)
    assert attached.perturbed_weight is None
    assert attached.skip_reason(head) is None
    attached.attach(head)
    direct = _small(head.weight.detach(), head.bias.detach())
    assert torch.equal(attached.perturbed_weight, direct.perturbed_weight)
    with pytest.raises(ValueError, match="does not match"):
        attached.attach(LinearHead(16, 5))
    reason = _small(None).skip_reason(IsoMaxPlusHead(16, 4))
    assert isinstance(reason, str) and "IsoMaxPlusHead" in reason
    with pytest.raises(ValueError):
        _small(None).attach(IsoMaxPlusHead(16, 4))
    with pytest.raises(RuntimeError, match="attach"):
        _small(None).fit_features(torch.rand(4, 16))

    for name, params in PRESETS.items():
        det = WeiPer.from_preset(name, seed=3)
        for key, value in params.items():
            assert getattr(det, key) == value
        assert (det.eps_z, det.eps_perturbed, det.seed) == (0.01, 0.025, 3)
    cifar = WeiPer.from_preset("cifar10", torch.randn(10, 512), torch.randn(10))
    assert cifar.perturbed_weight.shape == (1000, 512)
    assert (cifar.delta, cifar.lambda1, cifar.lambda2) == (1.8, 2.5, 0.1)
    assert WeiPer.from_preset("imagenet").smoothing == 40
    assert WeiPer.from_preset("cifar100").smoothing_perturbed == 40
    with pytest.raises(ValueError, match="cifar10.*cifar100.*imagenet"):
        WeiPer.from_preset("svhn")


# --------------------------------------------------------------------------- state
WEIGHT = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
BIAS = torch.randn(4, generator=torch.Generator().manual_seed(1))


def _fitted(**kw) -> tuple[WeiPer, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    train = torch.randn(300, 16, generator=gen).relu_()
    test = torch.randn(50, 16, generator=gen).relu_() * 1.5
    det = _small(WEIGHT, BIAS, **kw)
    det.fit_features(train)
    return det, train, test


def _state(det: WeiPer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in det.state_dict().items()}


def test_state_dict_round_trip_strict() -> None:
    det, _, test = _fitted()
    assert set(det.state_dict()) == {"fitted", "perturbed_weight", "perturbed_bias", "z_range",
                                     "wz_range", "train_hist_z", "train_hist_wz", "n_train"}
    fresh = _small(None, seed=99)
    fresh.attach(LinearHead(16, 4))
    fresh.load_state_dict(det.state_dict(), strict=True)
    assert torch.equal(fresh.score_features(test), det.score_features(test))
    assert torch.equal(fresh(ForwardOutputs(logits=torch.zeros(50, 4), features=test)),
                       det.score_features(test))
    assert int(det.n_train) == 300
    torch.testing.assert_close(det.train_hist_z.sum(), torch.tensor(1.0))


def test_streaming_fit_is_batching_and_rank_invariant() -> None:
    det, train, test = _fitted()
    reference = _state(det)
    batches = [train[:7], train[7:100], train[100:101], train[101:]]
    for features, chunk in ((batches, None), (train, 13), (tuple(batches), 64)):
        other = _small(WEIGHT, BIAS, chunk_size=chunk)  # same seed: same W~, not fitted
        other.fit_features(features)
        for key, value in _state(other).items():
            assert torch.equal(value, reference[key]), key
    other.fit(FitData(features=train))
    assert torch.equal(other.score_features(test), det.score_features(test))
    with pytest.raises(TypeError, match="list"):
        other.fit_features(b for b in batches)
    with pytest.raises(TypeError):
        other.fit_features(iter(batches))

    # Two simulated ranks (threads) holding uneven shards reduce to the 1-rank state.
    barrier, inbox, local = threading.Barrier(2), {}, threading.local()

    def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        local.calls += 1
        inbox[(local.calls, local.rank)] = tensor.detach().clone()
        barrier.wait()
        parts = torch.stack([inbox[(local.calls, r)] for r in range(2)])
        return {"sum": parts.sum(0), "max": parts.amax(0), "min": parts.amin(0)}[op]

    ranks = [_small(WEIGHT, BIAS) for _ in range(2)]
    shards, errors = [train[:37], train[37:]], []

    def run(rank: int) -> None:
        local.rank, local.calls = rank, 0
        try:
            ranks[rank].fit_features(shards[rank])
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
            t.join(timeout=60)
    finally:
        distributed.all_reduce = original
    assert not errors
    for rank in ranks:
        for key, value in _state(rank).items():
            assert torch.equal(value, reference[key]), key


# --------------------------------------------------------------------------- degenerate
def test_degenerate_inputs() -> None:
    det, train, test = _fitted()
    batch = det.score_features(test)
    assert batch.shape == (50,) and bool(torch.isfinite(batch).all())
    torch.testing.assert_close(det.score_features(test[3:4]), batch[3:4])  # batch of one
    assert bool(torch.isfinite(det.score_features(torch.zeros(5, 16))).all())
    assert det.score_features(torch.zeros(0, 16)).shape == (0,)
    # In-distribution features should on average score above scaled-up ones.
    assert det.score_features(train[:50]).mean() > det.score_features(train[:50] * 4).mean()

    zero_fit = _small(torch.randn(4, 16))
    zero_fit.fit_features(torch.zeros(20, 16))  # zero-width range in both spaces
    assert bool(torch.isfinite(zero_fit.score_features(test)).all())

    bad = test.clone()
    bad[2, 5] = float("nan")
    bad[4, 0] = float("inf")
    with pytest.raises(ValueError, match="WeiPer features contain NaN or infinite values in 2 of 50 rows"):
        det.score_features(bad)
    with pytest.raises(ValueError, match="non-finite"):
        _small(torch.randn(4, 16)).fit_features(bad)
    with pytest.raises(ValueError, match="no training features"):
        _small(torch.randn(4, 16)).fit_features([])
    unfitted = _small(torch.randn(4, 16))
    with pytest.raises(RuntimeError, match="fit"):
        unfitted(ForwardOutputs(logits=torch.zeros(2, 4), features=test[:2]))
    with pytest.raises(RuntimeError, match="fit"):
        unfitted.score_features(test[:2])
    with pytest.raises(ValueError, match="D = 8"):
        det.score_features(torch.zeros(2, 8))


def test_the_export_kernel_counts_exactly_like_the_eager_bincount(monkeypatch):
    """scaled_bin_counts uses bincount eagerly and a fixed-size scatter_add under torch.export
    (bincount's output size depends on the values); both give the same counts, overflow
    (values below lo, above hi) dropped and hi itself in the last bin."""
    from lightning_ood.detectors import weiper as weiper_module

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(7, 300, generator=generator) * 2
    values[0, :3] = torch.tensor([-1.5, 1.5, 9.0])  # lo, hi and an overflow value
    lo, hi, n_bins = -1.5, 1.5, 10
    scale = weiper_module.bin_scale(lo, hi, n_bins)
    eager = weiper_module.scaled_bin_counts(values, lo, scale, n_bins)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    exported_kernel = weiper_module.scaled_bin_counts(values, lo, scale, n_bins)
    assert torch.equal(eager, exported_kernel)
    inside = ((values >= lo) & (values <= hi)).sum(dim=1)
    assert torch.equal(eager.sum(dim=1), inside)  # overflow dropped, hi counted
    hand = torch.stack([torch.histc(row[(row >= lo) & (row <= hi)], bins=n_bins, min=lo, max=hi) for row in values])
    assert torch.equal(eager.to(hand.dtype), hand)
