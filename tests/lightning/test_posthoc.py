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
    # head: fc alone: features from fc's input, the 8 BasicBlocks found, so FeatureNorm runs too
    assert set(results["metrics"]) == {"msp", "max_logit", "energy", "ash_p", "ash_b", "ash_s", "weiper", "feature_norm"}
    assert results["skipped"] == {}
    assert 0 <= results["detectors"]["feature_norm"]["selected_block"] < 8
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


# ----------------------------------------------------------------- any backbone (issue 13)
TINY = "tests.nn.test_taps.TinyCifarResNet"  # akamaster-style: F.avg_pool2d in forward, head `linear`


def _hand_block_norms(network, names, x):
    """FeatureNorm of each named block's output, from hand-written forward hooks (float64)."""
    maps = []
    handles = [network.get_submodule(n).register_forward_hook(lambda m, a, z: maps.append(z.detach().double()))
               for n in names]
    with torch.no_grad():
        network(x)
    for handle in handles:
        handle.remove()
    return torch.stack([z.clamp(min=0).pow(2).sum(dim=(2, 3)).sqrt().mean(dim=1) for z in maps], dim=1)


def test_functional_pooling_network_with_head_alone_runs_feature_norm_and_exports(tmp_path):
    """head: linear is all a user names: features are the head's input, the blocks are found,
    FeatureNorm fits (NormRatio) and scores, and the .pt2 program equals the eager model."""
    from lightning_ood.deploy import load_program

    torch.manual_seed(0)
    model = PostHocClassifier(TINY, init_args={"num_classes": NUM_CLASSES}, head="linear")
    assert model.block_names == ["layer1.0", "layer2.0", "layer3.0"] and model.num_blocks == 3
    assert model.backbone.num_blocks == 3 and model.backbone.num_features == 64
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    inputs = []
    handle = model.network.linear.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        out = model.forward_outputs(x, with_block_norms=True)
    handle.remove()
    assert torch.equal(out.features, inputs[0])
    torch.testing.assert_close(out.block_norms.double(), _hand_block_norms(model.network, model.block_names, x))
    model.check_forward(x)

    callback = make_callback(detectors=["msp", "feature_norm"], output_dir=str(tmp_path), save_checkpoint=True)
    datamodule = RandomOODDataModule()
    pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(model, datamodule=datamodule)
    results = callback.results
    assert set(results["metrics"]) == {"msp", "feature_norm"} and results["skipped"] == {}
    fitted = results["detectors"]["feature_norm"]
    assert 0 <= fitted["selected_block"] < 3 and len(fitted["ratios"]) == 3
    # the report names the chosen block by its module name
    assert fitted["selected_block_name"] == model.block_names[fitted["selected_block"]]
    from lightning_ood.evaluation.report import summary_text

    assert f"selected block {fitted['selected_block']} ({fitted['selected_block_name']}) of 3" in summary_text(results)
    assert fitted["num_fit_images"] == SIZES["train"]
    detector = model.detectors["feature_norm"]
    assert int(detector.selected_block) == int(detector.ratios.argmax())

    program, metadata = load_program(callback.checkpoint_path)
    assert metadata["detectors"] == ["msp", "feature_norm"] and metadata["not_exported"] == {}
    images = datamodule.test_set.dataset.tensors[0][:5]
    model.eval()
    with torch.no_grad():
        got = program(images)
        expected = model.forward_outputs(images, with_block_norms=True)
        torch.testing.assert_close(got["logits"], expected.logits, rtol=1e-6, atol=1e-6)
        for name, detector in model.detectors.items():
            torch.testing.assert_close(got["scores"][name], detector(expected), rtol=1e-6, atol=1e-6)


def test_torchvision_resnet18_auto_blocks_equal_hand_written_hooks():
    torch.manual_seed(0)
    model = _resnet(None).eval()  # head fc by default, no penultimate
    assert model.hparams["penultimate"] is None and model.hparams["blocks"] == "auto"
    assert model.block_names == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    assert all(type(model.network.get_submodule(n)).__name__ == "BasicBlock" for n in model.block_names)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_outputs(x, with_block_norms=True)
        plain = model.forward_outputs(x)
    assert out.block_norms.shape == (3, 8) and plain.block_norms is None
    torch.testing.assert_close(out.block_norms.double(), _hand_block_norms(model.network, model.block_names, x))
    # the features are the pooled ones torchvision's avgpool gives, read from fc's input
    pooled = []
    handle = model.network.avgpool.register_forward_hook(lambda m, a, z: pooled.append(torch.flatten(z, 1)))
    with torch.no_grad():
        model.network(x)
    handle.remove()
    torch.testing.assert_close(out.features, pooled[0])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.network.modules())


@pytest.mark.parametrize("blocks, names", [
    ("layer4.*", ["layer4.0", "layer4.1"]),
    ("BasicBlock", [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]),
    (["layer3.1", "layer4.1"], ["layer3.1", "layer4.1"]),
    ("none", []),
])
def test_block_specs(blocks, names):
    model = _resnet(None, blocks=blocks).eval()
    assert model.block_names == names and model.backbone.num_blocks == len(names)
    with torch.no_grad():
        norms = model.forward_outputs(torch.randn(2, 3, 16, 16), with_block_norms=True).block_norms
    assert (norms is None) if not names else norms.shape == (2, len(names))


def test_feature_norm_is_skipped_only_without_blocks():
    from lightning_ood.detectors import FeatureNorm

    model = PostHocClassifier("tests.ddp_eval_script.FlatMLP", penultimate="hidden", head="fc")
    assert model.num_blocks == 0 and "no blocks" in FeatureNorm().skip_reason(model.head, model.backbone.num_blocks)
    assert FeatureNorm().skip_reason(_resnet(None).head, _resnet(None).backbone.num_blocks) is None


def test_dry_forward_names_the_problem_and_the_fix():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    wide = PostHocClassifier(TINY, head="linear", penultimate="layer3")
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=r"penultimate: 'layer3' gives features of width D = 4096 .* the head 'linear' "
                                         r"expects in_features = 64: leave penultimate unset"):
        wide.check_forward(x)
    assert wide.training  # modes are left as they were, and BatchNorm statistics too
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())

    with pytest.raises(ValueError, match=r"returns \(2, 3\), but the evaluation needs logits \(B, 5\)"):
        PostHocClassifier(TINY, head="layer3.0", num_classes=5, blocks="none").check_forward(x)
    with pytest.raises(ValueError, match=r"block 'linear' \(Linear\) gives \(2, 3\), not a \(B, C, H, W\) feature map"):
        PostHocClassifier(TINY, head="linear", blocks=["layer1.0", "linear"]).check_forward(x)
    with pytest.raises(ValueError, match=r"the pattern 'stage\*' matches no module name of TinyCifarResNet.*'layer1.0'"):
        PostHocClassifier(TINY, head="linear", blocks="stage*")
    with pytest.raises(ValueError, match=r"the network fails on a test batch of shape \(2, 1, 32, 32\)"):
        PostHocClassifier(TINY, head="linear").check_forward(x[:, :1])


def test_timm_model_by_class_path_with_its_classifier_as_default_head():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = PostHocClassifier("timm.create_model", init_args={"model_name": "convnext_atto", "num_classes": 3,
                                                               "pretrained": False}).eval()
    assert model.head_name == "head.fc" and model.num_blocks == 12
    assert model.block_names[:2] == ["stages.0.blocks.0", "stages.0.blocks.1"]
    x = torch.randn(2, 3, 32, 32)
    model.check_forward(x)
    with torch.no_grad():
        out = model.forward_outputs(x, with_block_norms=True)
    torch.testing.assert_close(out.block_norms.double(), _hand_block_norms(model.network, model.block_names, x))
    torch.testing.assert_close(model.head(out.features), out.logits)


def test_data_parallel_checkpoint_loads(tmp_path):
    """{"state_dict": ...} with nn.DataParallel's "module." prefix (akamaster's .th files)."""
    torch.manual_seed(0)
    network = torch.nn.DataParallel(torchvision.models.resnet18(num_classes=NUM_CLASSES))
    path = tmp_path / "resnet18.th"
    torch.save({"epoch": 3, "state_dict": network.state_dict()}, path)
    model = _resnet(str(path))
    for name, tensor in model.network.state_dict().items():
        assert torch.equal(tensor, network.module.state_dict()[name]), name


def test_a_wrong_penultimate_fails_in_setup_before_the_fitting_pass(tmp_path):
    """The callback's dry forward pass on one test batch: a feature width that does not fit
    the head fails before any image of the (possibly huge) fitting pass is read."""
    model = _resnet(None, penultimate="layer3")
    callback = make_callback(detectors=["msp", "weiper"], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="penultimate: 'layer3' gives features of width D = .*leave penultimate unset"):
        pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(model, datamodule=RandomOODDataModule())
    assert not hasattr(callback, "_collector")  # on_test_start (attach, fit, tuning) never ran


class BasicBlock(torch.nn.Module):
    """Named like a residual block (so ``blocks: auto`` picks it) but returns flat (B, D)
    vectors, not feature maps: FeatureNorm cannot read it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.linear(x))


class MLPWithFlatBlocks(torch.nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.flatten = torch.nn.Flatten()
        self.stem = torch.nn.Linear(3 * 16 * 16, 32)
        self.block = BasicBlock(32)
        self.fc = torch.nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.block(self.stem(self.flatten(x))))


def test_the_dry_run_checks_blocks_only_when_a_detector_reads_them(tmp_path):
    """blocks: auto finds the (flat) BasicBlock; an evaluation that reads no block norms is
    not refused for it, one with feature_norm is, in setup, naming the block."""
    model = PostHocClassifier("tests.lightning.test_posthoc.MLPWithFlatBlocks", head="fc")
    assert model.block_names == ["block"]
    callback = make_callback(detectors=["msp", "energy"], output_dir=str(tmp_path / "a"))
    pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(model, datamodule=RandomOODDataModule())
    assert set(callback.results["metrics"]) == {"msp", "energy"}
    callback = make_callback(detectors=["msp", "feature_norm"], output_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="block"):
        pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(model, datamodule=RandomOODDataModule())
    assert not hasattr(callback, "_collector")


def test_a_network_without_blocks_skips_feature_norm_instead_of_crashing(tmp_path):
    model = PostHocClassifier("tests.lightning.test_posthoc.MLPWithFlatBlocks", head="fc", blocks="none")
    assert model.num_blocks == 0
    callback = make_callback(detectors=["msp", "feature_norm"], output_dir=str(tmp_path))
    pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(model, datamodule=RandomOODDataModule())
    assert set(callback.results["metrics"]) == {"msp"} and "no blocks" in callback.results["skipped"]["feature_norm"]
