"""PostHocClassifier: a user's own nn.Module through trainer.test with OODEvaluation."""
import pytest
import pytorch_lightning as pl
import torch
import torchvision

from lightning_ood.detectors import MSP, Detector
from lightning_ood.lightning.posthoc import PostHocClassifier
from tests.ddp_eval_script import NUM_CLASSES, SIZES, FlatMLP, RandomOODDataModule, make_callback, trainer_kwargs


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A state_dict file of a random torchvision resnet18 with NUM_CLASSES outputs."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=NUM_CLASSES).state_dict(), path)
    return str(path)


def _resnet(weights, **kwargs):
    return PostHocClassifier("torchvision.models.resnet18", init_args={"num_classes": NUM_CLASSES},
                             weights=weights, **kwargs)


class _CountNetworkCalls(pl.Callback):
    def __init__(self):
        self.calls, self.per_batch = 0, []

    def setup(self, trainer, pl_module, stage):
        pl_module.network.register_forward_pre_hook(lambda module, args: setattr(self, "calls", self.calls + 1))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._start = self.calls

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.per_batch.append(self.calls - self._start)
        # the features handed to the detectors are the head's input of that same pass
        forward = outputs["outputs"]
        torch.testing.assert_close(pl_module.head(forward.features), forward.logits)


def test_torchvision_resnet_through_ood_evaluation(tmp_path, resnet_weights):
    model = _resnet(resnet_weights)
    saved = torch.load(resnet_weights, weights_only=True)
    for name, tensor in model.network.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    counter = _CountNetworkCalls()
    callback = make_callback(detectors=None, output_dir=str(tmp_path))  # the default detectors
    datamodule = RandomOODDataModule()
    pl.Trainer(**trainer_kwargs(callbacks=[callback, counter])).test(model, datamodule=datamodule)

    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.csv").is_file()
    results = callback.results
    assert set(results["metrics"]) == {"msp", "max_logit", "energy", "ash_p", "ash_b", "ash_s", "weiper"}
    assert set(results["skipped"]) == {"feature_norm"}
    assert "no blocks" in results["skipped"]["feature_norm"]
    assert results["id"]["n"] == SIZES["test"]
    assert {s: v["n"] for s, v in results["ood"].items()} == {"near_noise": 17, "far_blobs": 11}
    assert results["detectors"]["weiper"]["n_train"] == SIZES["train"]
    assert counter.per_batch == [1] * 14  # one forward of the user's network per test batch
    # the reported accuracy is that of the user's own network on the ID test set
    network = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    network.load_state_dict(torch.load(resnet_weights, weights_only=True))
    images, labels = datamodule.test_set.dataset.tensors
    with torch.no_grad():
        accuracy = float((network.eval()(images).argmax(1) == labels).float().mean())
    assert results["id"]["accuracy"] == pytest.approx(accuracy)


def test_evaluated_user_network_is_exported_with_its_detectors(tmp_path, resnet_weights):
    """A user's class cannot be rebuilt from a weights-only checkpoint, so the evaluation
    writes a torch.export program: it needs no Python class to load, and gives the logits,
    scores and is_ood of the eager network and detectors."""
    from lightning_ood.deploy import load_program

    model = _resnet(resnet_weights)
    callback = make_callback(detectors=["msp", "energy", "ash_s", "weiper"], output_dir=str(tmp_path),
                             save_checkpoint=True)
    datamodule = RandomOODDataModule()
    pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(model, datamodule=datamodule)
    assert callback.checkpoint_path == str(tmp_path / "model_with_detectors.pt2")
    assert not (tmp_path / "model_with_detectors.ckpt").exists()

    program, metadata = load_program(callback.checkpoint_path)
    assert metadata["detectors"] == ["msp", "energy", "ash_s", "weiper"] and metadata["not_exported"] == {}
    assert metadata["thresholds"] == pytest.approx(callback.results["thresholds"])
    assert metadata["preprocessing"]["crop_size"] == 16
    images = datamodule.test_set.dataset.tensors[0][:5]  # a batch size the export never saw
    got = program(images)
    model.eval()
    with torch.no_grad():
        expected = model.forward_outputs(images)
        torch.testing.assert_close(got["logits"], expected.logits, rtol=1e-5, atol=1e-5)
        for name, detector in model.detectors.items():
            torch.testing.assert_close(got["scores"][name], detector(expected), rtol=1e-5, atol=1e-5)
            assert torch.equal(got["is_ood"][name], got["scores"][name] < metadata["thresholds"][name])


@pytest.mark.parametrize("role, kwargs", [("penultimate", {"penultimate": "pool5"}), ("head", {"head": "classifier"})])
def test_unknown_module_names_list_the_modules(role, kwargs):
    with pytest.raises(ValueError, match=f"has no {role} module '{list(kwargs.values())[0]}'") as err:
        _resnet(None, **kwargs)
    for module in ("conv1", "layer1", "layer1.0"):
        assert f"'{module}'" in str(err.value)


def test_bad_class_path_and_weights_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="cannot import 'torchvision.models.resnet_typo'"):
        PostHocClassifier("torchvision.models.resnet_typo")
    with pytest.raises(ValueError, match="cannot import 'resnet18'"):
        PostHocClassifier("resnet18")
    other = tmp_path / "mlp.pth"  # fc.weight of another shape: torch raises a RuntimeError
    torch.save(FlatMLP().state_dict(), other)
    with pytest.raises(ValueError, match=r"(?s)does not fit torchvision.models.resnet18 .*size mismatch for fc.weight"):
        _resnet(str(other))
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(ValueError, match=r"does not fit torchvision.models.resnet18: missing \['conv1.weight'.*"
                                         r"unexpected \['encoder.weight'\]"):
        _resnet(str(foreign))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        _resnet(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="head 'fc' has 3 outputs but the data has 5 classes"):
        _resnet(None, num_classes=5)
    with pytest.raises(ValueError, match="class count is unknown: the head 'flatten' has no out_features; pass num_classes"):
        PostHocClassifier("tests.ddp_eval_script.FlatMLP", penultimate="hidden", head="flatten")


def test_ash_on_features_that_can_be_negative_is_skipped_with_a_reason(tmp_path):
    torch.manual_seed(0)
    model = PostHocClassifier("tests.ddp_eval_script.FlatMLP", penultimate="hidden", head="fc")
    callback = make_callback(detectors=["msp", "energy", "ash_p", "ash_s", "weiper"], output_dir=str(tmp_path))
    pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(model, datamodule=RandomOODDataModule())
    results = callback.results
    assert set(results["metrics"]) == {"msp", "energy", "weiper"}
    assert set(results["skipped"]) == {"ash_p", "ash_s"}
    for reason in results["skipped"].values():
        assert "features can be negative" in reason and "post-ReLU" in reason
    assert results["id"]["accuracy_by_detector"] == {}
    assert set(results["thresholds"]) == {"msp", "energy", "weiper"}


def test_ash_on_too_few_features_is_skipped_not_crashed(tmp_path):
    torch.manual_seed(0)
    model = PostHocClassifier("tests.ddp_eval_script.FlatMLP", init_args={"hidden": 8}, penultimate="hidden", head="fc")
    callback = make_callback(detectors=["msp", "ash_s"], output_dir=str(tmp_path))
    pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(model, datamodule=RandomOODDataModule())
    assert set(callback.results["metrics"]) == {"msp"} and "ash_s" in callback.results["skipped"]


class BranchOnValues(FlatMLP):
    """A network whose control flow depends on tensor values: torch.export cannot trace it."""

    def forward(self, x):
        logits = super().forward(x)
        return logits if float(logits.sum()) > 0 else -logits


def test_network_that_does_not_export_keeps_its_report(tmp_path):
    torch.manual_seed(0)
    model = PostHocClassifier("tests.lightning.test_posthoc.BranchOnValues", penultimate="hidden", head="fc")
    callback = make_callback(detectors=["msp", "energy"], output_dir=str(tmp_path), save_checkpoint=True)
    with pytest.warns(UserWarning, match="model_with_detectors.pt2 not written: .*network itself does not export"
                                         ".*GuardOnDataDependent"):
        pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(model, datamodule=RandomOODDataModule())
    assert callback.checkpoint_path is None and not (tmp_path / "model_with_detectors.pt2").exists()
    assert (tmp_path / "results.json").is_file() and set(callback.results["metrics"]) == {"msp", "energy"}


class _LogSumExp(Detector):
    """A user's own detector (not one of lightning_ood.detectors)."""

    name = "logsumexp"

    def score(self, outputs):
        return outputs.logits.logsumexp(dim=1)


def test_user_detectors_on_a_user_network_are_exported(tmp_path, resnet_weights):
    from lightning_ood.deploy import OODModel, export_program

    model = _resnet(resnet_weights).eval()
    model.detectors["logsumexp"] = _LogSumExp()
    wrapped = OODModel(model, preprocessing={"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    result = export_program(wrapped, tmp_path / "m.pt2", verbose=False)
    assert result["exported"] == ["logsumexp"] and result["not_exported"] == {}
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model.forward_outputs(x).logits.logsumexp(dim=1)
    torch.testing.assert_close(torch.export.load(str(tmp_path / "m.pt2")).module()(x)["scores"]["logsumexp"], expected)


class _BranchingScore(Detector):
    """A user detector whose score branches on a tensor value: it does not export."""

    name = "branching"

    def score(self, outputs):
        return outputs.logits.amax(1) if float(outputs.logits.sum()) > 0 else outputs.logits.amin(1)


def test_wandb_artifact_of_a_program_lists_only_the_exported_detectors(tmp_path, resnet_weights, monkeypatch):
    from types import SimpleNamespace

    from pytorch_lightning.loggers import WandbLogger

    from lightning_ood.lightning import artifacts

    model = _resnet(resnet_weights).eval()
    model.detectors.update({"msp": MSP(), "branching": _BranchingScore()})
    logged = []
    monkeypatch.setattr(artifacts, "log_artifact", lambda run, path, metadata: logged.append((path, metadata)))
    datamodule = RandomOODDataModule()
    datamodule.setup("test")
    trainer = SimpleNamespace(datamodule=datamodule, loggers=[WandbLogger(save_dir=str(tmp_path))])  # W&B disabled
    path = artifacts.save_after_evaluation(trainer, model, str(tmp_path), {"msp": 0.5, "branching": 0.1})
    assert path == str(tmp_path / "model_with_detectors.pt2")
    (logged_path, metadata), = logged
    assert logged_path == path and metadata["detectors"] == ["msp"] and metadata["thresholds"] == {"msp": 0.5}


def test_user_modules_in_the_working_directory_import_with_their_real_errors(tmp_path, monkeypatch):
    import sys

    from lightning_ood.lightning.cli import import_from_working_directory
    from lightning_ood.lightning.posthoc import import_class

    (tmp_path / "usernet_ok.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    (tmp_path / "usernet_broken.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.chdir(tmp_path)
    # as under `python evaluate.py`: sys.path[0] is the script's folder, not the working directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(ValueError, match=r"ModuleNotFoundError: No module named 'usernet_ok'.*run train.py/evaluate.py "
                                         r"from its folder or add the folder to PYTHONPATH"):
        import_class("usernet_ok.Net")
    import_from_working_directory()
    assert import_class("usernet_ok.Net").__name__ == "Net"
    with pytest.raises(ValueError, match=r"No module named 'a_package_that_is_not_installed'"):
        import_class("usernet_broken.Net")
    with pytest.raises(ValueError, match=r"module 'usernet_ok' \(.*usernet_ok.py\) has no attribute 'Nett'"):
        import_class("usernet_ok.Nett")
