"""The once-per-bundle finiteness check: ForwardOutputs.check_finite + finite_inputs_checked."""
import math

import pytest
import torch
from torch import nn

from lightning_ood.detectors import ASH, MSP, Energy, ForwardOutputs
from lightning_ood.detectors.functional import ash_b, ash_p, ash_s, check_finite, finite_inputs_checked


def _bundle(bad: str = "") -> ForwardOutputs:
    out = ForwardOutputs(torch.randn(4, 3), torch.rand(4, 8), torch.rand(4, 2))
    if bad:
        getattr(out, bad)[2, 1] = float("nan") if bad != "features" else float("inf")
    return out


@pytest.mark.parametrize("bad", ["logits", "features", "block_norms"])
def test_bundle_check_names_the_tensor(bad):
    with pytest.raises(ValueError, match=rf"^{bad} contain NaN or infinite values in 1 of 4 rows"):
        _bundle(bad).check_finite()


def test_bundle_check_passes_finite_outputs_and_returns_them():
    out = _bundle()
    assert out.check_finite() is out
    assert ForwardOutputs(torch.randn(2, 3), torch.rand(2, 5)).check_finite().block_norms is None
    big = ForwardOutputs(torch.full((2, 3), 3e38), torch.full((2, 2), -3e38))  # finite, sums overflow
    big.check_finite()
    with finite_inputs_checked():  # the bundle check itself is never skipped
        with pytest.raises(ValueError, match="features contain NaN"):
            _bundle("features").check_finite()


def test_detectors_skip_their_check_only_inside_the_block():
    out = _bundle("logits")
    for detector in (MSP(), Energy()):
        with pytest.raises(ValueError, match="NaN or infinite"):
            detector(out)  # alone: still refused
        with finite_inputs_checked():
            detector(out)  # the caller vouched for the bundle
        with pytest.raises(ValueError, match="NaN or infinite"):
            detector(out)  # reset on exit


def test_flag_is_reset_after_an_exception():
    with pytest.raises(RuntimeError):
        with finite_inputs_checked():
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_finite(torch.tensor([float("nan")]), "x")


def test_check_finite_fast_path_agrees_with_isfinite():
    assert check_finite(torch.full((3, 4), 3e38), "big") is None  # sum overflows, every entry finite
    assert check_finite(torch.full((2,), 60000.0, dtype=torch.float16), "half") is None
    check_finite(torch.arange(5), "integers")
    for value in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            x = torch.ones(3, 5, dtype=dtype)
            x[1, 2] = value
            with pytest.raises(ValueError, match="in 1 of 3 rows"):
                check_finite(x, "x")
    x = torch.zeros(2, 3)
    x[0, 0], x[0, 1] = float("inf"), -float("inf")  # inf - inf: the sum is NaN, still caught
    with pytest.raises(ValueError, match="in 1 of 2 rows"):
        check_finite(x, "x")


def _reference(x: torch.Tensor, percentile: float, variant: str) -> torch.Tensor:
    """The shaping as it was: sorted topk, out-of-place scatter."""
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    k = n - round(n * percentile / 100)
    values, indices = flat.topk(k, dim=1)
    if variant == "p":
        return torch.zeros_like(flat).scatter(1, indices, values).reshape(x.shape)
    if variant == "b":
        return torch.zeros_like(flat).scatter(1, indices, (flat.sum(1, keepdim=True) / k).expand(-1, k)).reshape(x.shape)
    pruned = torch.zeros_like(flat).scatter(1, indices, values)
    s1, s2 = flat.sum(1), values.sum(1)
    positive = s2 > 0
    e = torch.where(positive, s1 / torch.where(positive, s2, torch.ones_like(s2)), 0.0)
    e = e.clamp(max=math.log(torch.finfo(x.dtype).max) / 2)
    return (pruned * torch.exp(e).unsqueeze(1)).reshape(x.shape)


@pytest.mark.parametrize("variant, fn", [("p", ash_p), ("b", ash_b), ("s", ash_s)])
@pytest.mark.parametrize("n, percentile", [(512, 90), (2048, 99), (2048, 90), (10, 30), (64, 65)])
def test_ash_with_ties_keeps_the_same_positions_as_before(variant, fn, n, percentile):
    torch.manual_seed(n)
    x = torch.randint(0, 3, (50, n)).float()  # many ties at the threshold
    before = x.clone()
    out = fn(x, percentile)
    assert torch.equal(x, before)
    expected = _reference(x, percentile, variant)
    assert torch.equal(out != 0, expected != 0)  # exactly the same kept positions
    if variant == "s":  # s2 summed in another order: equal up to rounding
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    else:
        assert torch.equal(out, expected)


def test_ash_detector_inside_block_equals_alone():
    torch.manual_seed(0)
    head = nn.Linear(16, 4)
    out = ForwardOutputs(torch.randn(5, 4), torch.rand(5, 16))
    detector = ASH("s", 75)
    detector.attach(head)
    with torch.no_grad():
        alone = detector(out)
        with finite_inputs_checked():
            inside = detector(out.check_finite())
    assert torch.equal(alone, inside)
