"""Two-process DDP training (ddp_spawn): fit finishes, metrics and weights return.

On CPU (Gloo) without SyncBatchNorm: torch refuses SyncBatchNorm on CPU modules, so the
``sync_batchnorm=True`` run needs two GPUs and is skipped elsewhere.

Only weights and ``trainer.callback_metrics`` come back from the spawned processes, so the
checks are on those. ``val_size=25`` is odd so the distributed sampler pads.
"""
import pytest
import pytorch_lightning as pl
import torch

from lightning_ood.data import DigitsDataModule
from lightning_ood.lightning.module import OODClassifier


def _trainer(tmp_path, sync_batchnorm):
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", sync_batchnorm=sync_batchnorm, max_steps=2,
        limit_train_batches=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )


def test_ddp_spawn_fit_on_two_cpu_processes(tmp_path):
    pl.seed_everything(0)
    model = OODClassifier(loss="isomax_plus", num_classes=6, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path, sync_batchnorm=False)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=8, val_size=25))

    assert trainer.world_size == 2  # (trainer.global_step stays 0 here: loop state is not sent back)
    metrics = trainer.callback_metrics
    for key in ("train/loss_epoch", "train/acc", "val/acc"):
        assert key in metrics and torch.isfinite(metrics[key]), (key, dict(metrics))
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    # the trained weights came back to this process
    after = model.state_dict()
    assert not torch.equal(before["head.prototypes"], after["head.prototypes"])
    assert not torch.equal(before["backbone.bn1.running_mean"], after["backbone.bn1.running_mean"])
    assert int(after["backbone.bn1.num_batches_tracked"]) == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs >= 2 GPUs: torch's DDP refuses "
                    "SyncBatchNorm on CPU modules ('SyncBatchNorm layers only work with GPU modules')")
def test_ddp_spawn_fit_with_sync_batchnorm_on_two_gpus(tmp_path):
    pl.seed_everything(0)
    model = OODClassifier(num_classes=6, width=8)
    trainer = pl.Trainer(
        accelerator="gpu", devices=2, strategy="ddp_spawn", sync_batchnorm=True, max_steps=2,
        limit_train_batches=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=8, val_size=25))
    assert "val/acc" in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert int(model.state_dict()["backbone.bn1.num_batches_tracked"]) == 2
