import pytest
import torch

from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.detectors.featurenorm import MIN_JIGSAW_NORM, FeatureNorm
from lightning_ood.nn.heads import LinearHead

HEAD = LinearHead(4, 2)


def _fit_data() -> FitData:
    # Ratios per image: block 0 -> 1, 1; block 1 -> 3, 1; block 2 -> 2, 1.
    block_norms = torch.tensor([[1.0, 6.0, 4.0], [2.0, 1.0, 3.0]])
    jigsaw_norms = torch.tensor([[1.0, 2.0, 2.0], [2.0, 1.0, 3.0]])
    return FitData(torch.zeros(2, 4), block_norms=block_norms, jigsaw_block_norms=jigsaw_norms)


def _fitted() -> FeatureNorm:
    detector = FeatureNorm()
    detector.attach(HEAD, num_blocks=3)
    detector.fit(_fit_data())
    return detector


def test_flags_and_name():
    assert FeatureNorm.name == "feature_norm"
    assert FeatureNorm.requires_fit and FeatureNorm.requires_block_norms
    assert FeatureNorm.requires_jigsaw
    assert FeatureNorm.__doc__ and "CVPR 2023" in FeatureNorm.__doc__


def test_skip_reason():
    detector = FeatureNorm()
    assert isinstance(detector.skip_reason(HEAD, 0), str)
    assert detector.skip_reason(HEAD, 8) is None


def test_fit_selects_largest_normratio():
    detector = _fitted()
    torch.testing.assert_close(detector.ratios, torch.tensor([1.0, 2.0, 1.5]))
    assert int(detector.selected_block) == 1
    assert int(detector.num_fit_images) == 2
    assert bool(detector.fitted)


def test_fit_does_not_mutate_and_split_gives_same_result():
    data = _fit_data()
    before = (data.block_norms.clone(), data.jigsaw_block_norms.clone())
    whole = _fitted()
    assert torch.equal(data.block_norms, before[0])
    assert torch.equal(data.jigsaw_block_norms, before[1])
    # The mean is over images: one image's data alone gives that image's ratios.
    single = FeatureNorm(num_blocks=3)
    single.fit(FitData(data.features[:1], data.block_norms[:1], data.jigsaw_block_norms[:1]))
    torch.testing.assert_close(single.ratios, torch.tensor([1.0, 3.0, 2.0]))
    assert int(whole.selected_block) == int(single.selected_block) == 1


def test_score_reads_selected_block():
    detector = _fitted()
    norms = torch.tensor([[0.1, 7.0, 0.3], [0.4, 2.0, 0.6]])
    out = ForwardOutputs(logits=torch.zeros(2, 2), features=torch.zeros(2, 4), block_norms=norms)
    torch.testing.assert_close(detector(out), torch.tensor([7.0, 2.0]))


def test_score_before_fit_is_an_error():
    detector = FeatureNorm(num_blocks=3)
    out = ForwardOutputs(torch.zeros(1, 2), torch.zeros(1, 4), block_norms=torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="fit"):
        detector(out)
    with pytest.raises(RuntimeError, match="fit"):
        detector.score(out)


def test_score_needs_block_norms():
    detector = _fitted()
    with pytest.raises(ValueError, match="block_norms"):
        detector(ForwardOutputs(logits=torch.zeros(1, 2), features=torch.zeros(1, 4)))
    with pytest.raises(ValueError, match="block_norms"):
        detector(ForwardOutputs(torch.zeros(1, 2), torch.zeros(1, 4), block_norms=torch.ones(1, 5)))


def test_state_dict_round_trip_strict():
    detector = _fitted()
    fresh = FeatureNorm()
    fresh.attach(HEAD, num_blocks=3)
    assert not bool(fresh.fitted)
    fresh.load_state_dict(detector.state_dict(), strict=True)
    assert set(fresh.state_dict()) == {"fitted", "ratios", "selected_block", "num_fit_images"}
    for key, value in detector.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert int(fresh.selected_block) == 1 and bool(fresh.fitted)
    # Re-attaching with the same number of blocks keeps the fit; another number resets it.
    fresh.attach(HEAD, num_blocks=3)
    assert bool(fresh.fitted)
    fresh.attach(HEAD, num_blocks=4)
    assert not bool(fresh.fitted) and fresh.ratios.shape == (4,) and int(fresh.selected_block) == -1


def test_fit_on_inference_tensors_outside_inference_mode():
    detector = FeatureNorm()
    detector.attach(HEAD, num_blocks=3)
    with torch.inference_mode():
        data = _fit_data()
        with torch.inference_mode(False):
            detector.fit(data)
    assert not detector.ratios.is_inference()
    assert int(detector.selected_block) == 1
    fresh = FeatureNorm(num_blocks=3)
    fresh.load_state_dict(detector.state_dict(), strict=True)
    torch.testing.assert_close(fresh.ratios, detector.ratios)


def test_zero_jigsaw_norm_is_clamped():
    detector = FeatureNorm(num_blocks=2)
    detector.fit(FitData(torch.zeros(1, 4), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])))
    assert torch.isfinite(detector.ratios).all()
    torch.testing.assert_close(detector.ratios, torch.tensor([1.0 / MIN_JIGSAW_NORM, 0.0]))
    assert int(detector.selected_block) == 0


def test_fit_input_errors():
    detector = FeatureNorm()
    with pytest.raises(RuntimeError, match="attach"):
        detector.fit(_fit_data())
    detector.attach(HEAD, num_blocks=3)
    with pytest.raises(ValueError, match="jigsaw_block_norms"):
        detector.fit(FitData(torch.zeros(2, 4), block_norms=torch.ones(2, 3)))
    with pytest.raises(ValueError, match="shape"):
        detector.fit(FitData(torch.zeros(2, 4), torch.ones(2, 4), torch.ones(2, 4)))
    with pytest.raises(ValueError, match="no training images"):
        detector.fit(FitData(torch.zeros(0, 4), torch.ones(0, 3), torch.ones(0, 3)))
    bad = _fit_data()
    bad.block_norms[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        detector.fit(bad)
    assert not bool(detector.fitted)


def test_two_ranks_match_one(monkeypatch):
    """Simulated 2-rank fit (each rank one image) equals the 1-rank fit on both images."""
    import lightning_ood.detectors.featurenorm as module

    whole = _fitted()
    data = _fit_data()
    shards = [
        FitData(data.features[i:j], data.block_norms[i:j], data.jigsaw_block_norms[i:j])
        for i, j in ((0, 1), (1, 2))
    ]
    sent = []  # what rank 1 contributes to each collective

    def record(tensor, op="sum"):
        sent.append(tensor.clone())
        return tensor.clone()

    monkeypatch.setattr(module, "all_reduce", record)
    FeatureNorm(num_blocks=3).fit(shards[1])
    from_rank_1 = iter(sent)
    monkeypatch.setattr(module, "all_reduce", lambda t, op="sum": t + next(from_rank_1))
    rank_0 = FeatureNorm(num_blocks=3)
    rank_0.fit(shards[0])

    assert len(sent) == 2
    for key, value in whole.state_dict().items():
        assert torch.equal(rank_0.state_dict()[key], value), key
