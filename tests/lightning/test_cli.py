"""The command line: every config parses and instantiates, bad choices fail at parse time."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from lightning_ood.lightning.cli import OODCLI, check_checkpoint_fits
from lightning_ood.data import OODSet
from lightning_ood.lightning.module import OODClassifier
from tests.helpers import SUBPROCESS_THREADS, write_random_images


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")

# The papers' recipes (docs/methods.md): max_epochs, lr, weight_decay, nesterov, scheduler, milestones, batch
RECIPES = {
    "cifar10_resnet18_ce": (100, 0.1, 5e-4, False, "multistep", [50, 75, 90], 128),
    "cifar10_resnet18_isomax_plus": (300, 0.1, 1e-4, True, "multistep", [150, 200, 250], 64),
    "cifar10_resnet18_l2_norm": (60, 0.1, 5e-4, False, "cosine", None, 128),
    "imagenet_resnet50_ce": (90, 0.1, 1e-4, False, "multistep", [30, 60, 80], 256),
    "imagenet_resnet50_isomax_plus": (90, 0.1, 1e-4, True, "multistep", [30, 60, 80], 256),
    "imagenet_resnet50_l2_norm": (100, 0.1, 1e-4, False, "cosine", None, 256),
}
for _loss in ("ce", "isomax_plus", "l2_norm"):
    RECIPES[f"cifar100_resnet18_{_loss}"] = RECIPES[f"cifar10_resnet18_{_loss}"]

OPENOOD_CIFAR_FAR = {"mnist", "svhn", "textures", "places365"}


def _name(path):
    return os.path.splitext(os.path.basename(path))[0]


def _recipe(name):
    """The paper recipe of a config; ``*_fast`` variants share their base config's recipe."""
    return RECIPES[name[: -len("_fast")] if name.endswith("_fast") else name]


def test_all_recipe_configs_exist():
    names = {_name(p) for p in CONFIGS}
    assert set(RECIPES) | {"quickstart"} <= names
    for name in names - {"quickstart"}:
        _recipe(name)  # every other config follows one of the recipes


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_print_config(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        OODCLI(args=["fit", "--config", path, "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["logger"]["class_path"] == "pytorch_lightning.loggers.WandbLogger"
    assert config["trainer"]["logger"]["init_args"]["project"] == "lightning_ood"
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "runs"
    assert config["data"]["class_path"].startswith("lightning_ood.data.")
    callbacks = config["trainer"]["callbacks"] or []
    assert all(not cb["class_path"].startswith("lightning.") for cb in callbacks)  # one namespace
    name = _name(path)
    if name == "quickstart":
        assert config["data"]["class_path"] == "lightning_ood.data.DigitsDataModule"
        return
    epochs, lr, wd, nesterov, scheduler, milestones, batch = _recipe(name)
    model, data = config["model"], config["data"]["init_args"]
    assert model["loss"] == name.removesuffix("_fast").split("_resnet")[1][3:]  # "..._resnet18_<loss>[_fast]"
    assert model["backbone"] == ("resnet50" if name.startswith("imagenet") else "resnet18")
    assert config["trainer"]["max_epochs"] == epochs and data["batch_size"] == batch
    assert (model["lr"], model["weight_decay"], model["momentum"]) == (lr, wd, 0.9)
    assert model["nesterov"] is nesterov and model["scheduler"] == scheduler
    if milestones:
        assert model["milestones"] == milestones and model["gamma"] == 0.1
    if model["loss"] == "isomax_plus":
        assert model["entropic_scale"] == 10.0
    if model["loss"] == "l2_norm":
        assert model["l2_temperature"] == 1.0
    assert any(cb["class_path"] == "pytorch_lightning.callbacks.ModelCheckpoint" for cb in callbacks)
    groups = {s["name"]: s["group"] for s in data["ood_sets"]}
    if name.startswith("cifar"):
        other = "cifar100" if name.startswith("cifar10_") else "cifar10"
        assert groups == {other: "near", "tinyimagenet": "near", **{n: "far" for n in OPENOOD_CIFAR_FAR}}
        assert [s["path"] for s in data["ood_sets"] if s["name"] == "tinyimagenet"][0]
    else:
        assert groups == {"ssb_hard": "near", "ninco": "near", "inaturalist": "far", "sun": "far",
                          "places": "far", "textures": "far"}
        assert all(s["path"] for s in data["ood_sets"])
        assert (data["train_dir"], data["test_dir"]) == ("/data/imagenet/train", "/data/imagenet/val")


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("n01", "n02"):
            os.makedirs(root / split / cls)
            for i in range(n):
                Image.new("RGB", (40, 40), (i * 40, 80, 120)).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("path", [p for p in CONFIGS if _name(p) != "quickstart"], ids=_name)
def test_recipe_config_instantiates(path, tiny_tree):
    """Trainer, model and datamodule are built from the config (ImageNet folders replaced by a
    tiny tree); data.num_classes reaches the model."""
    args = ["--config", path]
    if _name(path).startswith("imagenet"):
        args += ["--data.train_dir", str(tiny_tree / "train"), "--data.test_dir", str(tiny_tree / "val")]
    cli = OODCLI(args=args, run=False)
    name = _name(path)
    epochs, lr, wd, nesterov, scheduler, milestones, batch = _recipe(name)
    expected_classes = {"cifar10_": 10, "cifar100": 100, "imagenet": 2}[name[:8]]
    assert cli.datamodule.num_classes == expected_classes == cli.model.num_classes
    assert cli.model.head(torch.zeros(1, cli.model.backbone.num_features)).shape == (1, expected_classes)
    assert cli.model.hparams["loss"] in name and cli.trainer.max_epochs == epochs
    assert isinstance(cli.trainer.logger, WandbLogger)
    assert any(isinstance(cb, ModelCheckpoint) and cb.monitor == "val/acc" for cb in cli.trainer.callbacks)
    assert all(isinstance(s, OODSet) for s in cli.datamodule.ood_sets) and len(cli.datamodule.ood_sets) == 6
    cli.model.trainer = cli.trainer
    optimizers = cli.model.configure_optimizers()
    group = optimizers["optimizer"].param_groups[0]
    assert (group["lr"], group["nesterov"], group["weight_decay"]) == (lr, nesterov, wd)
    schedule = optimizers["lr_scheduler"]["scheduler"]
    if scheduler == "cosine":
        assert isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR) and schedule.T_max == epochs
    else:
        assert isinstance(schedule, torch.optim.lr_scheduler.MultiStepLR)
        assert sorted(schedule.milestones.elements()) == milestones


def test_unknown_loss_fails_at_parse_time_listing_choices():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "fit", "--config", QUICKSTART, "--model.loss", "nope"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **SUBPROCESS_THREADS, "WANDB_MODE": "disabled"}, timeout=300,
    )
    assert result.returncode != 0
    assert "model.loss" in result.stderr and "nope" in result.stderr
    for choice in ("ce", "isomax_plus", "l2_norm"):
        assert f"'{choice}'" in result.stderr
    assert "Epoch" not in result.stdout  # nothing trained


def test_unknown_backbone_fails_at_parse_time_listing_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        OODCLI(args=["fit", "--config", QUICKSTART, "--model.backbone", "vgg16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.backbone" in err and "'resnet18'" in err and "'resnet50'" in err and "vgg16" in err


@pytest.mark.parametrize("loss", ["ce", "isomax_plus"])
def test_imagenet_recipe_trains_then_prints_the_ood_report(tmp_path, loss):
    """An ImageNet recipe (bf16-mixed), shrunk (width 8, 64 px, 2 steps) on a generated class-per-folder
    tree: fit, then the recipe's OODEvaluation callback fits, tunes and scores every detector
    on the 16 ResNet50 blocks, and writes the report and the checkpoint with detectors."""
    for c, name in enumerate(("ant", "bee", "cow")):
        write_random_images(tmp_path / "train" / name, 6, seed=c, size=(72, 72))
        write_random_images(tmp_path / "val" / name, 2, seed=10 + c, size=(72, 72))
    write_random_images(tmp_path / "ood_near", 5, seed=20, size=(72, 72))
    write_random_images(tmp_path / "ood_far", 4, seed=21, size=(72, 72))
    ood_sets = [{"name": "near_set", "group": "near", "path": str(tmp_path / "ood_near")},
                {"name": "far_set", "group": "far", "path": str(tmp_path / "ood_far")}]
    args = [
        "fit", "--config", os.path.join(REPO, "configs", f"imagenet_resnet50_{loss}.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),  # W&B is disabled in tests (conftest)
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.width", "8",
        "--data.train_dir", str(tmp_path / "train"), "--data.test_dir", str(tmp_path / "val"),
        "--data.image_size", "64", "--data.batch_size", "4", "--data.num_workers", "0", "--data.val_size", "6",
        "--data.ood_sets", json.dumps(ood_sets),
    ]
    cli = OODCLI(args=args)
    (evaluation,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "OODEvaluation"]
    assert evaluation.tune == "jigsaw" and evaluation.fit_samples == 5000
    (results_path,) = glob.glob(str(tmp_path / "runs" / "*" / "*" / "results.json"))
    results_dir = os.path.dirname(results_path)
    with open(results_path) as f:
        results = json.load(f)
    assert results["id"]["n"] == 6 and results["ood"] == {"near_set": {"n": 5, "group": "near"}, "far_set": {"n": 4, "group": "far"}}
    assert {"msp", "max_logit", "energy", "feature_norm"} <= set(results["metrics"])
    if loss == "isomax_plus":
        # its native minimum-distance score is added; WeiPer's perturbed linear projections do
        # not apply to a distance head (skipped with a reason)
        assert "min_distance" in results["metrics"]
        assert "weiper" not in results["metrics"] and "weiper" in results["skipped"]
    else:
        assert "weiper" in results["metrics"]
    for scores in results["metrics"].values():
        assert set(scores) == {"near_set", "far_set", "near", "far"}
        for metric in scores["near_set"].values():
            assert 0.0 <= metric <= 1.0
    assert os.path.isfile(os.path.join(results_dir, "model_with_detectors.ckpt"))


def test_missing_imagenet_folder_fails_with_a_clear_error(tmp_path):
    """The datamodule's FileNotFoundError reaches the user as itself, not wrapped in
    jsonargparse's "Does not validate against any of the Union subtypes"."""
    path = os.path.join(REPO, "configs", "imagenet_resnet50_ce.yaml")
    missing = str(tmp_path / "no_imagenet" / "train")
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*no_imagenet/train \(expected one sub-folder of images per class\)"):
        OODCLI(args=["--config", path, "--data.train_dir", missing], run=False)


def test_sync_batchnorm_on_cpu_fails_before_spawning(capsys):
    args = ["fit", "--config", QUICKSTART, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp_spawn", "--trainer.sync_batchnorm", "true", "--trainer.logger", "false"]
    with pytest.raises(ValueError, match="sync_batchnorm needs GPUs.*drop --trainer.sync_batchnorm"):
        OODCLI(args=args)


def test_check_checkpoint_fits_names_the_class_count(tmp_path):
    ten = OODClassifier(num_classes=10, width=8)
    path = tmp_path / "ten.ckpt"
    torch.save({"state_dict": ten.state_dict(), "hyper_parameters": dict(ten.hparams)}, path)
    check_checkpoint_fits(str(path), OODClassifier(num_classes=10, width=8))  # fits: no error
    with pytest.raises(ValueError, match=r"num_classes: checkpoint 10 vs configured 6"):
        check_checkpoint_fits(str(path), OODClassifier(num_classes=6, width=8))
    with pytest.raises(ValueError, match=r"loss: checkpoint 'ce' vs configured 'isomax_plus'"):
        check_checkpoint_fits(str(path), OODClassifier(num_classes=10, width=8, loss="isomax_plus"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        check_checkpoint_fits(str(tmp_path / "absent.ckpt"), ten)
