"""The contract every registered detector keeps (parametrised over the registry, as timm
tests every registered model): it builds by name, attaches, fits on streamed batches,
scores with higher = ID, survives a strict ``state_dict`` round trip, a model-file
save/load and ``torch.export``, and fits identically on 1 and 2 processes. A new detector
gets all of this by registering; its own file of method tests adds the hand-computed math.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_ood.deploy import OODModel, export_program, load, save_with_detectors
from lightning_ood.detectors import FitData, ForwardOutputs, build_detector, detector_name, detector_names, entry
from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.functional import jigsaw
from lightning_ood.evaluation.metrics import ood_metrics
from lightning_ood.nn.classifier import Classifier
from lightning_ood.nn.heads import IsoMaxPlusHead, LinearHead

NAMES = detector_names()
D, C, BLOCKS = 16, 4, 3


def _head_for(name: str) -> torch.nn.Module:
    """A linear head, or IsoMax+'s distance head for a detector that needs one."""
    torch.manual_seed(0)
    head = LinearHead(D, C)
    if build_detector(name).skip_reason(head, BLOCKS) is not None:
        head = IsoMaxPlusHead(D, C)
    with torch.no_grad():
        weight = head.weight if isinstance(head, LinearHead) else head.prototypes
        weight.copy_(0.1 * torch.randn(C, D) + 2.0 * torch.eye(C, D))
        if isinstance(head, LinearHead):
            head.bias.zero_()
    return head


def _synthetic(n: int, ood: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, labels, block norms, jigsaw block norms), all non-negative like post-ReLU
    features: ID features are diffuse (every unit active) with a peak on their class's axis
    and large block norms; OOD features are one peak on an axis no class uses, the rest
    near zero, with small block norms."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    if ood:
        features = 0.05 * torch.rand(n, D, generator=gen)
        features[torch.arange(n), torch.randint(C, D, (n,), generator=gen)] += 3.0
        norms = 1.0 + 0.1 * torch.rand(n, BLOCKS, generator=gen)
    else:
        features = 1.0 + 0.2 * torch.rand(n, D, generator=gen)
        features[torch.arange(n), labels] += 3.0 + 0.3 * torch.rand(n, generator=gen)
        norms = 2.0 + 0.1 * torch.rand(n, BLOCKS, generator=gen)
    jigsaw_norms = 1.0 + 0.1 * torch.rand(n, BLOCKS, generator=gen)
    return features, labels, norms, jigsaw_norms


def _outputs(head: torch.nn.Module, features: torch.Tensor, norms: torch.Tensor) -> ForwardOutputs:
    with torch.no_grad():
        return ForwardOutputs(head(features), features, norms)


def _fit_data(head: torch.nn.Module, n: int = 96, seed: int = 1) -> FitData:
    features, labels, norms, jigsaw_norms = _synthetic(n, ood=False, seed=seed)
    with torch.no_grad():
        logits = head(features)
    return FitData(features, norms, jigsaw_norms, labels, logits)


def _fitted(name: str, head: torch.nn.Module, data: FitData) -> Detector:
    detector = build_detector(name)
    detector.attach(head, BLOCKS)
    if detector.requires_fit:
        detector.fit(data)
    return detector


@pytest.mark.parametrize("name", NAMES)
def test_builds_by_name_and_alias_for_every_family(name):
    for family in ("cifar10", "cifar100", "imagenet", "svhn"):
        detector = build_detector(name, family)
        assert isinstance(detector, Detector) and detector_name(detector) == name
    for alias in entry(name).aliases:
        assert detector_name(build_detector(alias.upper())) == name
    assert set(type(detector).tuning_grid) == set(detector.hyperparameters())


@pytest.mark.parametrize("name", NAMES)
def test_fits_on_streamed_chunks_and_scores_higher_for_in_distribution(name, monkeypatch):
    head = _head_for(name)
    data = _fit_data(head)
    whole = _fitted(name, head, data)
    original_chunks = FitData.chunks
    monkeypatch.setattr(FitData, "chunks", lambda self, rows=4096: original_chunks(self, 7))
    streamed = _fitted(name, head, data)
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(streamed.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)

    id_out = _outputs(head, *_synthetic(64, ood=False, seed=2)[::2])
    ood_out = _outputs(head, *_synthetic(64, ood=True, seed=3)[::2])
    id_scores, ood_scores = whole(id_out), whole(ood_out)
    assert id_scores.shape == (64,) and bool(torch.isfinite(id_scores).all() and torch.isfinite(ood_scores).all())
    # AUROC with ID as the positive class: higher score = more in-distribution
    assert ood_metrics(id_scores, ood_scores)["auroc"] > 0.9


@pytest.mark.parametrize("name", NAMES)
def test_strict_state_dict_round_trip_into_a_fresh_detector(name):
    head = _head_for(name)
    fitted = _fitted(name, head, _fit_data(head))
    fresh = build_detector(name)
    fresh.attach(head, BLOCKS)
    fresh.load_state_dict(fitted.state_dict(), strict=True)
    outputs = _outputs(head, *_synthetic(20, ood=True, seed=4)[::2])
    torch.testing.assert_close(fresh(outputs), fitted(outputs), rtol=0, atol=0)


def _network_with(name: str) -> tuple[Classifier, torch.Tensor]:
    """A tiny ResNet with the detector attached and fitted on its own outputs."""
    torch.manual_seed(0)
    loss = "isomax_plus" if "IsoMaxPlus" in (build_detector(name).skip_reason(LinearHead(8, 3), 2) or "") else "ce"
    network = Classifier("resnet18", loss, num_classes=3, width=4).eval()
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    detector = build_detector(name)
    with torch.no_grad():
        outputs = network.forward_outputs(images, with_block_norms=True)
        jigsaw_norms = network.forward_outputs(jigsaw(images, generator=torch.Generator().manual_seed(6)),
                                               with_block_norms=True).block_norms
    detector.attach(network.head, network.backbone.num_blocks)
    if detector.requires_fit:
        detector.fit(FitData(outputs.features, outputs.block_norms, jigsaw_norms, torch.arange(64) % 3, outputs.logits))
    network.detectors[name] = detector
    return network, images


@pytest.mark.parametrize("name", NAMES)
def test_model_file_and_exported_program_give_the_eager_scores(name, tmp_path):
    network, images = _network_with(name)
    with torch.no_grad():
        expected = network.detectors[name](network.forward_outputs(images[:5], with_block_norms=True))
    path = save_with_detectors(network, tmp_path / "model.ckpt")
    loaded = load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images[:5])["scores"][name], expected, rtol=1e-6, atol=1e-6)
    result = export_program(OODModel(network), tmp_path / "model.pt2", image_size=16, verbose=False)
    assert result["exported"] == [name], result["not_exported"]
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    with torch.no_grad():  # a batch size the program was not traced with
        torch.testing.assert_close(program(images[:5])["scores"][name], expected, rtol=1e-6, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fit_on_shard(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        states = {}
        for name in NAMES:
            head = _head_for(name)
            data = _fit_data(head)
            half = len(data) // 2  # contiguous shards: the gathered rows come back in rank order
            shard = FitData(*(None if t is None else t[rank * half:(rank + 1) * half] for t in
                              (data.features, data.block_norms, data.jigsaw_block_norms, data.labels, data.logits)))
            states[name] = {k: v.clone() for k, v in _fitted(name, head, shard).state_dict().items()}
        results[rank] = states
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_processes_fit_every_detector_exactly_like_one():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_fit_on_shard, args=(_free_port(), results), nprocs=2, join=True)
    for name in NAMES:
        single = _fitted(name, _head_for(name), _fit_data(_head_for(name))).state_dict()
        for rank in (0, 1):
            for key, value in single.items():
                got = results[rank][name][key]
                assert got.shape == value.shape, (name, key)
                torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-6, msg=f"{name} rank {rank} {key}")


def test_a_users_detector_without_a_name_is_reported_by_its_class_name():
    class DistanceToOrigin(Detector):
        reads = ("features",)

        def score(self, outputs: ForwardOutputs) -> torch.Tensor:
            return -outputs.features.norm(dim=1)

    class Other(DistanceToOrigin):
        pass

    assert detector_name(DistanceToOrigin()) == "distancetoorigin" and detector_name(Other()) == "other"
