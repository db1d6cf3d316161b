"""evaluate.py: a trained checkpoint through the quickstart config, and checkpoints of
another architecture failing fast with the settings that differ."""
import json
import os
import subprocess
import sys

import pytest
import yaml
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_ood.lightning.cli import check_checkpoint_fits, evaluate_main
from lightning_ood.data import DigitsDataModule
from lightning_ood.lightning.module import OODClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])  # LightningCLI(args=...) warns about pytest's own argv


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An OODClassifier (width 8, the quickstart's 6 ID digits) trained for 2 steps."""
    torch.manual_seed(0)
    model = OODClassifier(width=8, num_classes=6, lr=0.05)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _accuracy_of(checkpoint: str) -> tuple[float, int]:
    """ID test accuracy of the checkpoint's weights, computed here independently."""
    model = OODClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    datamodule = DigitsDataModule()
    datamodule.setup("test")
    correct = 0
    with torch.no_grad():
        for images, labels, _ in DataLoader(datamodule.test_set, batch_size=256):
            correct += int((model(images).argmax(1) == labels).sum())
    return correct / len(datamodule.test_set), len(datamodule.test_set)


def test_evaluate_script_on_the_quickstart_config(tmp_path, checkpoint):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    root = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), "--config", QUICKSTART, "--ckpt_path", checkpoint,
         "--trainer.logger", "false", "--model.width", "8", "--trainer.default_root_dir", str(root)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    folders = list((root / "results").iterdir())
    assert len(folders) == 1, folders  # this run's own folder
    with open(folders[0] / "results.json") as f:
        results = json.load(f)
    # the resolved config that made the report sits beside it
    with open(folders[0] / "config.yaml") as f:
        config = yaml.safe_load(f)
    assert config["ckpt_path"] == checkpoint and config["model"]["init_args"]["width"] == 8
    accuracy, n_test = _accuracy_of(checkpoint)
    assert results["id"]["dataset"] == "digits" and results["id"]["n"] == n_test
    # the checkpoint's weights were evaluated, not a freshly initialised model
    assert results["id"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    heldout = DigitsDataModule()
    heldout.setup("test")
    assert {s: v["n"] for s, v in results["ood"].items()} == {
        name: len(dataset) for name, dataset in heldout.ood_test_sets.items()}
    assert {s: v["group"] for s, v in results["ood"].items()} == {"digits_heldout": "near", "photo_patches": "far"}
    # the default detectors (ce loss: no native score)
    assert set(results["metrics"]) == {"msp", "max_logit", "energy", "ash_p", "ash_b", "ash_s", "weiper", "feature_norm"}
    for rows in results["metrics"].values():
        assert set(rows) == {"digits_heldout", "photo_patches", "near", "far"}
        assert all(0.0 <= v["auroc"] <= 1.0 + 1e-6 for v in rows.values())
    assert "AUROC" in done.stdout


def test_checkpoint_of_another_width_fails_fast(tmp_path, checkpoint, monkeypatch):
    """The quickstart configures width 16; the checkpoint has width 8."""
    def unreachable(*args, **kwargs):
        raise AssertionError("trainer.test ran although the checkpoint does not fit")

    monkeypatch.setattr(pl.Trainer, "test", unreachable)
    with pytest.raises(ValueError, match=r"different setup \(width: checkpoint 8 vs configured 16\)"):
        evaluate_main(["--config", QUICKSTART, "--ckpt_path", checkpoint, "--trainer.logger", "false",
                       "--trainer.default_root_dir", str(tmp_path)])


def test_checkpoint_of_another_class_count_fails_fast(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(pl.Trainer, "test", lambda *a, **k: pytest.fail("trainer.test ran"))
    with pytest.raises(ValueError, match=r"num_classes: checkpoint 6 vs configured 4.*num_classes comes from the data"):
        evaluate_main(["--config", QUICKSTART, "--ckpt_path", checkpoint, "--trainer.logger", "false",
                       "--model.width", "8", "--data.init_args.id_classes", "[0, 1, 2, 3]",
                       "--trainer.default_root_dir", str(tmp_path)])


def test_check_checkpoint_fits_names_every_difference(tmp_path, checkpoint):
    model = OODClassifier(width=16, num_classes=6, loss="isomax_plus")
    with pytest.raises(ValueError) as err:
        check_checkpoint_fits(checkpoint, model)
    message = str(err.value)
    assert "loss: checkpoint 'ce' vs configured 'isomax_plus'" in message
    assert "width: checkpoint 8 vs configured 16" in message
    assert "num_classes" not in message.split("(")[1].split(")")[0]
    check_checkpoint_fits(checkpoint, OODClassifier(width=8, num_classes=6))  # fits: no error


def test_check_checkpoint_fits_rejects_missing_and_foreign_files(tmp_path):
    model = OODClassifier(width=8, num_classes=6)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        check_checkpoint_fits(str(tmp_path / "nope.ckpt"), model)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable Lightning checkpoint"):
        check_checkpoint_fits(str(garbage), model)
    weights_only = tmp_path / "weights.ckpt"
    torch.save(model.state_dict(), weights_only)
    with pytest.raises(ValueError, match="not a Lightning training checkpoint"):
        check_checkpoint_fits(str(weights_only), model)


def test_evaluating_without_weights_is_refused_naming_ckpt_path(tmp_path, monkeypatch):
    """No --ckpt_path, no pretrained: random weights would be evaluated and exported as deployable."""
    monkeypatch.setattr(pl.Trainer, "test", lambda *a, **k: pytest.fail("trainer.test ran on random weights"))
    with pytest.raises(ValueError, match=r"no weights to evaluate: pass --ckpt_path .*--random_weights true"):
        evaluate_main(["--config", QUICKSTART, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_random_weights_are_evaluated_when_asked_for(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pl.Trainer, "test", lambda self, model, **k: calls.append(k.get("ckpt_path")))
    evaluate_main(["--config", QUICKSTART, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
                   "--random_weights", "true"])
    assert calls == [None]


def test_posthoc_network_without_weights_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(pl.Trainer, "test", lambda *a, **k: pytest.fail("trainer.test ran on random weights"))
    model = tmp_path / "model.yaml"
    model.write_text("class_path: lightning_ood.lightning.posthoc.PostHocClassifier\n"
                     "init_args: {class_path: torchvision.models.resnet18, init_args: {num_classes: 6}, head: fc}\n")
    with pytest.raises(ValueError, match=r"no weights to evaluate: give the network's state_dict file"):
        evaluate_main(["--config", QUICKSTART, "--trainer.logger", "false", "--model", str(model),
                       "--trainer.default_root_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
