"""W&B offline logging: what a run leaves on disk, and the CLI's config saved into each run.

An offline run (wandb 0.31) is ``<save_dir>/wandb/offline-run-*/``; scalars live only in
the binary ``run-*.wandb`` file, where the logged key names are visible as bytes.
"""
import glob
import os
import subprocess
import sys

import pytorch_lightning as pl
import wandb
import yaml
from pytorch_lightning.loggers import WandbLogger

from lightning_ood.data import DigitsDataModule
from lightning_ood.lightning.module import OODClassifier
from tests.helpers import SUBPROCESS_THREADS


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _offline_runs(save_dir):
    return sorted(glob.glob(os.path.join(str(save_dir), "wandb", "offline-run-*")))


def _run_bytes(run_dir):
    files = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    assert len(files) == 1, os.listdir(run_dir)
    with open(files[0], "rb") as f:
        return f.read()


def test_offline_fit_writes_metrics_into_the_run_file(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # nothing may be written outside tmp_path
    pl.seed_everything(0)
    logger = WandbLogger(save_dir=str(tmp_path), project="lightning_ood_test")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_steps=2, limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1,
    )
    model = OODClassifier(loss="isomax_plus", num_classes=6, width=8)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    run_id = logger.experiment.id
    logger.experiment.finish()
    # finish() may return before the W&B service has written every record of an offline
    # run (seen with wandb 0.31); teardown() waits for the service to flush and exit
    wandb.teardown()

    runs = _offline_runs(tmp_path)
    assert len(runs) == 1 and runs[0].endswith(run_id)
    data = _run_bytes(runs[0])
    for key in (b"train/loss_step", b"train/loss_epoch", b"train/acc", b"val/acc", b"trainer/global_step"):
        assert key in data, key
    assert b"isomax_plus" in data  # the hyper-parameters went into the run config
    assert not os.path.exists(tmp_path / "wandb-summary.json")
    assert sorted(os.listdir(tmp_path)) == ["wandb"]


def _train_cli(save_dir, cwd):
    command = [
        sys.executable, os.path.join(REPO, "train.py"), "fit", "--config", os.path.join(REPO, "configs", "quickstart.yaml"),
        "--trainer.callbacks", "[]",  # the OOD evaluation is tested elsewhere; keep this run short
        "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.width", "8", "--trainer.logger.init_args.save_dir", str(save_dir),
    ]
    env = {**os.environ, **SUBPROCESS_THREADS, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_saves_config_into_each_run_and_reruns_in_the_same_save_dir(tmp_path):
    save_dir = tmp_path / "runs"
    for attempt in (1, 2):
        result = _train_cli(save_dir, tmp_path)
        assert result.returncode == 0, f"run {attempt} failed:\n{result.stderr[-3000:]}"
        assert "config.yaml" not in result.stderr or "exists" not in result.stderr

    runs = _offline_runs(save_dir)
    assert len(runs) == 2
    run_ids = [os.path.basename(r).rsplit("-", 1)[1] for r in runs]
    assert run_ids[0] != run_ids[1]
    for run, run_id in zip(runs, run_ids):
        # the resolved config sits in the run's own folder <save_dir>/<project>/<run id>/
        config_path = save_dir / "lightning_ood" / run_id / "config.yaml"
        config = yaml.safe_load(config_path.read_text())
        assert config["model"]["width"] == 8 and config["trainer"]["max_steps"] == 2
        assert config["data"]["class_path"] == "lightning_ood.data.DigitsDataModule"
        # ... and in the W&B run's files, for `wandb sync`
        assert os.path.exists(os.path.join(run, "files", "config.yaml"))
        data = _run_bytes(run)
        assert b"train/loss_epoch" in data and b"val/acc" in data
        assert b"cli" in data  # the config went into the run's config under "cli"
        # a checkpoint per run, not shared
        assert len(os.listdir(save_dir / "lightning_ood" / run_id / "checkpoints")) == 1
    assert not (save_dir / "config.yaml").exists()  # Lightning's shared config file is not written
    assert not (tmp_path / "lightning_logs").exists()
