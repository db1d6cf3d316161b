"""Detector hyper-parameter selection on jigsaw pseudo-OOD / OOD validation data."""
import pytest
import pytorch_lightning as pl
import lightning_ood
import torch
from torch import nn

from lightning_ood.lightning.callback import OODEvaluation
from lightning_ood.data import DigitsDataModule, OODSet
from lightning_ood.detectors import ASH, WeiPer
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.evaluation.metrics import ood_metrics
from lightning_ood.lightning.module import OODClassifier
from lightning_ood.evaluation.tuning import TuningData, tune_detector


def _outputs(features: torch.Tensor, head: nn.Module) -> ForwardOutputs:
    return ForwardOutputs(logits=head(features), features=features)


@pytest.fixture
def synthetic():
    """ID features concentrated on a few dimensions per class, pseudo-OOD spread out."""
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(32, 4)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4, 32, generator=generator))
        head.bias.zero_()
    labels = torch.arange(200) % 4
    id_features = torch.rand(200, 32, generator=generator) * 0.3
    id_features[torch.arange(200), labels * 8] += 3.0
    ood_features = torch.rand(200, 32, generator=generator)
    train = torch.rand(300, 32, generator=generator) * 0.3
    train[torch.arange(300), (torch.arange(300) % 4) * 8] += 3.0
    data = TuningData(_outputs(id_features, head), _outputs(ood_features, head), "jigsaw", "synthetic")
    return head, data, FitData(features=train)


def test_tune_ash_is_deterministic_and_never_worse_than_its_default(synthetic):
    head, data, _ = synthetic
    choices = []
    for _ in range(2):
        detector = ASH("s", 95.0)
        detector.attach(head)
        entry = tune_detector(detector, data, grid={"percentile": (10, 50, 80, 90)})
        choices.append(detector.percentile)
        aurocs = {row["percentile"]: row["auroc"] for row in entry["grid"]}
        assert set(aurocs) == {10, 50, 80, 90, 95}  # the default is always in the grid
        assert aurocs[detector.percentile] == max(aurocs.values())
        assert aurocs[detector.percentile] >= aurocs[95.0]
        # the recorded AUROC is the detector's real AUROC at the chosen value
        real = ood_metrics(detector.score(data.id_outputs), detector.score(data.ood_outputs))["auroc"]
        assert real == pytest.approx(aurocs[detector.percentile])
        assert entry["parameters"] == {"percentile": detector.percentile} and entry["default"] == {"percentile": 95.0}
    assert choices[0] == choices[1]


def test_tie_goes_to_the_published_default(synthetic):
    head, data, _ = synthetic
    same = TuningData(data.id_outputs, data.id_outputs, "jigsaw", "identical sets")  # AUROC 0.5 everywhere
    detector = ASH("b", 65.0)
    detector.attach(head)
    tune_detector(detector, same, grid={"percentile": (10, 50, 90)})
    assert detector.percentile == 65.0


def test_tune_weiper_refits_for_the_chosen_delta(synthetic):
    head, data, fit_data = synthetic
    grid = {"delta": (1.2, 2.4), "lambda1": (0.1, 2.5), "lambda2": (0.1,), "smoothing": (4,),
            "smoothing_perturbed": (15,)}
    detector = WeiPer.from_preset("cifar10", n_repeats=5)
    detector.attach(head)
    detector.fit(fit_data)
    entry = tune_detector(detector, data, fit_data, grid)
    rows = {tuple(row[k] for k in grid): row["auroc"] for row in entry["grid"]}
    assert len(rows) == 2 * 2 + 1  # the grid plus the preset's own values
    assert rows[tuple(entry["parameters"][k] for k in grid)] == max(rows.values())
    # the tuned detector equals a fresh one built with the chosen values and fitted once
    fresh = WeiPer.from_preset("cifar10", n_repeats=5, **entry["parameters"])
    fresh.attach(head)
    fresh.fit(fit_data)
    features = data.id_outputs.features[:20]
    torch.testing.assert_close(detector.score_features(features), fresh.score_features(features))


class _TestSetSpy(pl.Callback):
    """Records how many test images were read before the test loop starts."""

    def __init__(self, datamodule: DigitsDataModule) -> None:
        self.datamodule = datamodule
        self.reads_before_test_loop = None

    def setup(self, trainer, pl_module, stage):
        dataset = self.datamodule.test_set
        original = dataset.__getitem__.__func__
        self.reads = 0

        def counting(ds, index):
            self.reads += 1
            return original(ds, index)

        dataset.__class__ = type("SpiedDataset", (dataset.__class__,), {"__getitem__": counting})

    def on_test_start(self, trainer, pl_module):  # runs after OODEvaluation.on_test_start
        self.reads_before_test_loop = self.reads


def _evaluate(width: int, tune: str, tmp_path, **callback_kwargs):
    pl.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=32, val_size=60)
    model = OODClassifier(num_classes=6, width=width, lr=0.05)
    trainer_kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
    pl.Trainer(max_steps=6, limit_val_batches=0, **trainer_kwargs).fit(model, datamodule=datamodule)
    callback = OODEvaluation(detectors=["msp", "ash_s", "ash_b", "weiper"], fit_samples=96, tune=tune,
                             tune_samples=60, output_dir=str(tmp_path), plots=False,
                             weiper_grid={"delta": [1.8], "lambda1": [0.1, 2.5], "lambda2": [0.1],
                                          "smoothing": [4], "smoothing_perturbed": [15]},
                             **callback_kwargs)
    datamodule.setup("test")
    spy = _TestSetSpy(datamodule)
    pl.Trainer(callbacks=[callback, spy], **trainer_kwargs).test(model, datamodule=datamodule, verbose=False)
    return model, callback, spy


@pytest.mark.parametrize("width", [8, 16])
def test_jigsaw_tuning_end_to_end_never_reads_test_data(width, tmp_path):
    model, callback, spy = _evaluate(width, "jigsaw", tmp_path)
    assert spy.reads_before_test_loop == 0
    tuning = callback.results["tuning"]
    assert set(tuning) == {"ash_s", "ash_b", "weiper"}
    for name in ("ash_s", "ash_b"):
        entry = tuning[name]
        assert entry["mode"] == "jigsaw" and entry["split"].startswith("60 ID validation images")
        assert model.detectors[name].percentile == entry["parameters"]["percentile"]
        aurocs = {row["percentile"]: row["auroc"] for row in entry["grid"]}
        assert aurocs[entry["parameters"]["percentile"]] >= aurocs[entry["default"]["percentile"]]
    assert model.detectors["weiper"].lambda1 == tuning["weiper"]["parameters"]["lambda1"]
    # the chosen values survive the checkpoint the callback wrote
    loaded = lightning_ood.load(callback.checkpoint_path)
    assert loaded.detectors["ash_s"].percentile == tuning["ash_s"]["parameters"]["percentile"]
    for key, value in tuning["weiper"]["parameters"].items():
        assert getattr(loaded.detectors["weiper"], key) == value
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(loaded(images)["scores"]["weiper"], model.detectors["weiper"](model.forward_outputs(images)))


def test_tuning_is_deterministic_for_a_seed(tmp_path):
    _, first, _ = _evaluate(8, "jigsaw", tmp_path / "a")
    _, second, _ = _evaluate(8, "jigsaw", tmp_path / "b")
    assert first.results["tuning"] == second.results["tuning"]


def test_ood_validation_mode_and_published_defaults(tmp_path):
    _, callback, _ = _evaluate(8, "ood_val", tmp_path / "val", ood_val_sets=[OODSet("photo_patches", "far")])
    entry = callback.results["tuning"]["ash_s"]
    assert entry["mode"] == "ood_val" and "photo_patches" in entry["split"]
    model, callback, _ = _evaluate(8, "defaults", tmp_path / "defaults")
    assert callback.results["tuning"]["ash_s"] == {"mode": "defaults", "values": "published"}
    assert model.detectors["ash_s"].percentile == 95.0


def test_ood_val_mode_needs_validation_sets():
    with pytest.raises(ValueError, match="ood_val_sets"):
        OODEvaluation(tune="ood_val")
    with pytest.raises(ValueError, match="jigsaw, ood_val, defaults"):
        OODEvaluation(tune="sometimes")


def test_explicitly_configured_values_are_reported_as_configured(tmp_path, capsys):
    from lightning_ood.detectors import ASH
    from tests.ddp_eval_script import run_evaluation

    _, callback = run_evaluation(str(tmp_path), detectors=None, tune="defaults")
    assert callback.results["tuning"]["ash_s"] == {"mode": "defaults", "values": "published"}
    capsys.readouterr()
    _, callback = run_evaluation(str(tmp_path), detectors=[ASH("s", 65), "msp"], tune="defaults")
    assert callback.results["tuning"]["ash_s"] == {"mode": "defaults", "values": "configured"}
    assert callback.results["detectors"]["ash_s"]["percentile"] == 65
    assert "ash_s: as configured (tune=defaults)" in capsys.readouterr().out
