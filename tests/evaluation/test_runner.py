"""The plain-Python evaluation steps: de-duplication of padded samples, per-index jigsaw
seeding, detector resolution, thresholds, dropping post-ReLU detectors on negative features."""
import pytest
import torch

from lightning_ood.detectors import ASH, MSP, build_detector
from lightning_ood.evaluation.metrics import id_threshold
from lightning_ood.evaluation.runner import (
    drop_negative_feature_detectors, gather_samples, jigsaw_batch, resolve_detectors,
)
from lightning_ood.nn.heads import LinearHead


def test_gather_drops_padded_repeats_and_sorts_by_index():
    # two "ranks" worth of chunks as one process sees them after padding: 5 samples,
    # indices 4 and 0 repeated (a padded sampler repeats whole samples)
    def row(i):
        return [10.0 * i, -float(i)]

    indices = [torch.tensor([4, 1, 3]), torch.tensor([0, 2]), torch.tensor([4, 0])]
    buffer = {
        "indices": indices,
        "labels": [i % 3 for i in indices],
        "scores": [torch.tensor([row(int(i)) for i in chunk]) for chunk in indices],
        "predictions": [],  # OOD sets have no predictions: the key is left out
    }
    out = gather_samples(buffer)
    assert set(out) == {"indices", "labels", "scores"}
    assert out["indices"].tolist() == [0, 1, 2, 3, 4]
    assert out["labels"].tolist() == [0, 1, 2, 0, 1]
    assert out["scores"].tolist() == [row(i) for i in range(5)]


def test_gather_keeps_rows_aligned_with_their_index():
    indices = torch.tensor([7, 3, 3, 9, 1, 7])
    buffer = {"indices": [indices], "labels": [indices * 2], "scores": [indices[:, None].float().repeat(1, 3)],
              "predictions": [torch.stack([indices, indices + 1], 1)]}
    out = gather_samples(buffer)
    assert out["indices"].tolist() == [1, 3, 7, 9]
    assert out["labels"].tolist() == [2, 6, 14, 18]
    assert out["scores"][:, 2].tolist() == [1.0, 3.0, 7.0, 9.0]
    assert out["predictions"].tolist() == [[1, 2], [3, 4], [7, 8], [9, 10]]


def test_jigsaw_is_seeded_per_sample_index_not_per_batch():
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    indices = torch.tensor([10, 11, 12, 13, 14, 15])
    whole = jigsaw_batch(images, indices, 3)
    split = torch.cat([jigsaw_batch(images[:2], indices[:2], 3), jigsaw_batch(images[2:], indices[2:], 3)])
    assert torch.equal(whole, split)  # batch composition (ranks, batch size) does not matter
    assert not torch.equal(whole, images)
    # the same image under another index is shuffled differently; another seed too
    assert not torch.equal(jigsaw_batch(images[:1], torch.tensor([99]), 3), whole[:1])
    assert not torch.equal(jigsaw_batch(images, indices, 4), whole)


def test_id_threshold_hand_computed():
    scores20 = torch.arange(1.0, 21.0)[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    assert id_threshold(scores20, 0.95) == 2.0  # 19 of 20 scores >= 2
    assert id_threshold(torch.arange(1.0, 24.0), 0.95) == 2.0  # ceil(0.95 * 23) = 22 scores >= 2
    assert id_threshold(torch.arange(1.0, 24.0), 0.9) == 3.0  # ceil(20.7) = 21 scores >= 3
    assert id_threshold(scores20, 1.0) == 1.0
    assert id_threshold(torch.tensor([5.0, 5.0, 5.0, 1.0]), 0.5) == 5.0  # ties: 3 scores >= 5
    assert id_threshold(torch.tensor([3.0, 3.0, 1.0, 1.0]), 0.95) == 1.0





def test_resolve_detectors_splits_skipped_and_configured():
    resolved = resolve_detectors(["msp", "min_distance", ASH("p", 80.0)], "cifar10", LinearHead(8, 3), 0)
    assert list(resolved.to_attach) == ["msp", "ash_p"] and set(resolved.skipped) == {"min_distance"}
    assert resolved.configured == {"ash_p"} and resolved.to_attach["ash_p"].percentile == 80.0
    assert "IsoMaxPlusHead" in resolved.skipped["min_distance"]
    with pytest.raises(ValueError, match="'msp' is configured twice"):
        resolve_detectors(["msp", MSP()], "cifar10", LinearHead(8, 3), 0)


def test_post_relu_detectors_are_dropped_only_on_negative_features():
    detectors = [build_detector("msp"), build_detector("ash_s"), build_detector("scale")]
    names = ["msp", "ash_s", "scale"]
    skipped = {}
    assert drop_negative_feature_detectors(names, detectors, 0.0, skipped) == [0, 1, 2] and skipped == {}
    assert drop_negative_feature_detectors(names, detectors, -0.5, skipped) == [0]
    assert set(skipped) == {"ash_s", "scale"} and "min -0.5" in skipped["ash_s"]
