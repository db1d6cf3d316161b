import math

import numpy as np
import pytest
import torch

from lightning_ood.detectors import functional as functional_module

from lightning_ood.detectors.functional import (
    ash_b,
    ash_p,
    ash_s,
    check_finite,
    energy,
    feature_norm,
    jigsaw,
    max_logit,
    msp,
)

ASH = [ash_p, ash_b, ash_s]


# ---------------------------------------------------------------- ASH hand examples
def test_ash_hand_example_p50():
    # n = 4, p = 50 -> k = 4 - round(2) = 2: keep 3 and 4.
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(ash_p(x, 50), torch.tensor([[0.0, 0.0, 3.0, 4.0]]))
    # s1 = 10, k = 2 -> kept positions become 5.
    assert torch.equal(ash_b(x, 50), torch.tensor([[0.0, 0.0, 5.0, 5.0]]))
    # s1 = 10, s2 = 7 -> scale exp(10/7).
    scale = math.exp(10 / 7)
    torch.testing.assert_close(ash_s(x, 50), torch.tensor([[0.0, 0.0, 3 * scale, 4 * scale]]))


def test_ash_k_uses_round_half_to_even():
    # n = 10, p = 25 -> round(2.5) = 2 -> k = 8 (two smallest pruned).
    x = torch.arange(1.0, 11.0).unsqueeze(0)
    assert int((ash_p(x, 25) != 0).sum()) == 8
    # n = 10, p = 35 -> round(3.5) = 4 -> k = 6.
    assert int((ash_p(x, 35) != 0).sum()) == 6


def test_ash_per_sample_on_4d_input():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]]).reshape(2, 1, 2, 2)
    out = ash_b(x, 50)
    assert out.shape == x.shape
    expected = torch.tensor([[0.0, 0.0, 5.0, 5.0], [50.0, 50.0, 0.0, 0.0]]).reshape(2, 1, 2, 2)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("fn", ASH)
@pytest.mark.parametrize("shape", [(3, 64), (3, 4, 4, 4)])
@pytest.mark.parametrize("percentile", [0.0, 65.0, 90.0, 95.0])
def test_ash_keeps_exactly_k_and_does_not_mutate(fn, shape, percentile):
    n = math.prod(shape[1:])
    x = torch.randperm(3 * n).reshape(shape).float() + 1.0  # distinct, positive
    before = x.clone()
    out = fn(x, percentile)
    assert torch.equal(x, before)
    assert out.shape == x.shape and out.dtype == x.dtype
    k = n - round(n * percentile / 100)
    flat, src = out.reshape(3, -1), x.reshape(3, -1)
    assert torch.equal((flat != 0).sum(dim=1), torch.full((3,), k))
    # The kept positions are the k largest of each sample.
    top = src.topk(k, dim=1).indices
    assert torch.equal(flat.gather(1, top) != 0, torch.ones(3, k, dtype=torch.bool))


def test_ash_p_keeps_values_unchanged_and_s_is_scaled_p():
    x = torch.rand(5, 100) + 0.1
    p = ash_p(x, 80)
    kept = p != 0
    assert torch.equal(p[kept], x[kept])
    expected_scale = torch.exp(x.sum(1) / p.sum(1)).unsqueeze(1)
    torch.testing.assert_close(ash_s(x, 80), p * expected_scale)


def test_ash_b_preserves_sum():
    x = torch.randn(4, 2, 3, 5)
    torch.testing.assert_close(ash_b(x, 70).sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))


def test_ash_percentile_zero_keeps_everything():
    x = torch.rand(2, 10) + 0.1
    assert torch.equal(ash_p(x, 0), x)
    torch.testing.assert_close(ash_s(x, 0), x * math.e)


@pytest.mark.parametrize("fn", ASH)
@pytest.mark.parametrize("bad", [-1.0, 100.5, float("nan")])
def test_ash_rejects_percentile_off_scale(fn, bad):
    with pytest.raises(ValueError, match="0-100 scale"):
        fn(torch.rand(2, 8), bad)


@pytest.mark.parametrize("fn", ASH)
def test_ash_k_zero_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="k = 0"):
        fn(torch.rand(2, 8), 100)
    with pytest.raises(ValueError, match="k = 0"):
        fn(torch.rand(2, 8), 95)  # round(7.6) = 8 -> k = 0


@pytest.mark.parametrize("fn", ASH)
def test_ash_rejects_non_finite_input(fn):
    x = torch.rand(2, 8)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn(x, 50)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(3, 16),  # s2 == 0
        -torch.rand(3, 16) - 0.1,  # all negative: s2 < 0
        torch.cat([torch.full((1, 14), -1.0), torch.tensor([[1e-30, 0.0]])], dim=1),  # s2 tiny > 0
        torch.ones(1, 2048),  # batch of one, s1 / s2 = n / k = 1024 at p = 99.9
        torch.randn(1, 16),
    ],
)
def test_ash_s_stays_finite(x):
    p = 99.9 if x.shape[1] == 2048 else 90.0
    out = ash_s(x, p)
    assert torch.isfinite(out).all()


def test_ash_s_guard_scale_one_when_kept_sum_not_positive():
    x = -torch.arange(1.0, 9.0).unsqueeze(0)  # kept values -1, -2, -3, -4: s2 = -10
    torch.testing.assert_close(ash_s(x, 50), ash_p(x, 50))
    assert torch.equal(ash_s(torch.zeros(1, 8), 50), torch.zeros(1, 8))


def test_ash_s_exponent_is_clamped():
    out = ash_s(torch.ones(1, 2048), 99.9)  # k = 2, exponent 1024 -> clamped
    limit = math.exp(math.log(torch.finfo(torch.float32).max) / 2)
    torch.testing.assert_close(out.max(), torch.tensor(limit), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- logit scores
def test_logit_scores_hand_example():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    torch.testing.assert_close(energy(logits), torch.tensor([math.log(4.0), 2.0 + math.log(2.0)]))
    torch.testing.assert_close(msp(logits), torch.tensor([0.75, 0.5]))
    torch.testing.assert_close(max_logit(logits), torch.tensor([math.log(3.0), 2.0]))


def test_energy_is_finite_for_large_logits():
    logits = torch.tensor([[1000.0, 999.0, 100.0], [150.0, 150.0, 150.0]])
    out = energy(logits)
    assert torch.isfinite(out).all()
    expected = torch.tensor([1000.0 + math.log1p(math.exp(-1.0)), 150.0 + math.log(3.0)])
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(msp(logits)).all()


def test_logit_scores_do_not_mutate():
    logits = torch.randn(4, 5)
    before = logits.clone()
    for fn in (energy, msp, max_logit):
        assert fn(logits).shape == (4,)
    assert torch.equal(logits, before)


def test_check_finite():
    check_finite(torch.ones(3), "x")
    with pytest.raises(ValueError, match="logits contain NaN"):
        check_finite(torch.tensor([1.0, float("inf")]), "logits")


# ---------------------------------------------------------------- feature norm
def test_feature_norm_hand_example():
    # Sample 0: channel 0 = [[3, -1], [4, 0]] -> ReLU -> norm 5; channel 1 all negative -> 0.
    # Sample 1: channel 0 = [[1, 1], [1, 1]] -> 2; channel 1 = [[0, 0], [0, 6]] -> 6.
    z = torch.tensor(
        [
            [[[3.0, -1.0], [4.0, 0.0]], [[-1.0, -2.0], [-3.0, -4.0]]],
            [[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 6.0]]],
        ]
    )
    before = z.clone()
    torch.testing.assert_close(feature_norm(z), torch.tensor([2.5, 4.0]))
    assert torch.equal(z, before)


def test_feature_norm_needs_4d():
    with pytest.raises(ValueError, match="B, M, H, W"):
        feature_norm(torch.rand(2, 3))


# ---------------------------------------------------------------- jigsaw
def _tiles(img: torch.Tensor, grid: int) -> list[tuple]:
    c, h, w = img.shape
    th, tw = h // grid, w // grid
    return sorted(
        tuple(img[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw].flatten().tolist())
        for i in range(grid)
        for j in range(grid)
    )


def test_jigsaw_permutes_tiles_and_zeroes_border():
    images = torch.rand(4, 3, 32, 35) + 1.0  # non-zero everywhere; 10x11 px tiles
    before = images.clone()
    out = jigsaw(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, before)
    assert out.shape == images.shape
    assert torch.equal(out[:, :, 30:, :], torch.zeros(4, 3, 2, 35))
    assert torch.equal(out[:, :, :, 33:], torch.zeros(4, 3, 32, 2))
    for b in range(4):
        assert _tiles(out[b], 3) == _tiles(images[b], 3)
        assert not torch.equal(out[b, :, :30, :33], images[b, :, :30, :33])


def test_jigsaw_permutation_is_per_image():
    image = torch.arange(3 * 9 * 9, dtype=torch.float32).reshape(1, 3, 9, 9)
    out = jigsaw(image.expand(8, -1, -1, -1), generator=torch.Generator().manual_seed(1))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1


def test_jigsaw_seeded_determinism():
    images = torch.rand(3, 1, 12, 12)
    a = jigsaw(images, generator=torch.Generator().manual_seed(7))
    b = jigsaw(images, generator=torch.Generator().manual_seed(7))
    c = jigsaw(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_jigsaw_grid_one_is_identity_inside():
    images = torch.rand(2, 1, 5, 5)
    out = jigsaw(images, grid=1)
    assert torch.equal(out, images)


def test_jigsaw_rejects_tiny_images():
    with pytest.raises(ValueError, match="too small"):
        jigsaw(torch.rand(1, 1, 2, 2), grid=3)


def test_shaped_head_logits_in_chunks_equals_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    features = torch.rand(100, 8)
    calls = []

    def clip(rows: torch.Tensor) -> torch.Tensor:
        calls.append(rows.shape[0])
        return rows.clamp(max=0.5)

    with torch.no_grad():
        whole = head(features.clamp(max=0.5))
        monkeypatch.setattr(functional_module, "SHAPED_CHUNK_VALUES", 8 * 60)  # 60 rows >= 16 C = 48
        chunked = functional_module.shaped_head_logits(head, features, clip)
    assert calls == [60, 40]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    # a head with many classes is not split (each chunk would re-read its weight)
    calls.clear()
    with torch.no_grad():
        functional_module.shaped_head_logits(torch.nn.Linear(8, 50), features, clip)
    assert calls == [100]


def test_stable_row_norm_on_every_scale_and_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 64, generator=g)
    rows[1] *= 1e30  # squares overflow float32
    rows[2] *= 1e-30  # squares underflow
    rows[3] = 0.0
    rows[4, :] = 1e-3
    rows[4, 7] = 3e38  # one entry near float32's maximum
    rows[5] *= 1e-25  # squares subnormal, digits lost in a plain sum
    expected = np.linalg.norm(rows.double().numpy(), axis=1)
    eager = functional_module.stable_row_norm(rows)
    np.testing.assert_allclose(eager.double().numpy(), expected, rtol=1e-6, atol=0)
    # the plain norm is what needs the fix-up here
    plain = torch.linalg.vector_norm(rows, dim=1)
    assert torch.isinf(plain[1]) and plain[2] == 0 and torch.isinf(plain[4])
    # the sync-free selection (other devices, torch.export) gives the same values
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(functional_module.stable_row_norm(rows), eager, rtol=0, atol=0)
