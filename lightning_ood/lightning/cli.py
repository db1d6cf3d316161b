"""The command line: one LightningCLI subclass used by ``train.py`` and ``evaluate.py``."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import yaml
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from lightning_ood.data.base import OODDataModule
from lightning_ood.lightning.module import OODClassifier
from lightning_ood.io import atomic_write_text
from lightning_ood.lightning.runs import fix_run_directory_before_spawning, run_directory


def instantiate_with_clear_errors(instantiate: Callable[[], None]) -> None:
    """jsonargparse wraps an error raised while building a subclass (a missing data folder,
    a bad argument) in "Does not validate against any of the Union subtypes"; raise the
    original, clear error instead."""
    try:
        instantiate()
    except ValueError as err:
        if "Union subtypes" in str(err) and isinstance(err.__cause__, (FileNotFoundError, ValueError)):
            raise err.__cause__ from None
        raise


class SaveConfigToRun(SaveConfigCallback):
    """Stores the resolved config inside the run instead of a shared folder.

    Lightning's default writes ``config.yaml`` to the logger's save dir, which with W&B is
    the same folder for every run (the second run aborts). Here the config goes to the
    run's own directory and, with W&B, into the run's config and files.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # run_directory() is a collective: every rank resolves it here, because Lightning
        # calls save_config() on rank 0 only (a broadcast there waits forever for the others)
        self._run_dir = run_directory(trainer)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Rank 0 only (Lightning's contract): files and W&B, nothing that syncs."""
        text = self.parser.dump(self.config, skip_none=False)
        out_dir = self._run_dir
        atomic_write_text(os.path.join(out_dir, "config.yaml"), text)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"cli": yaml.safe_load(text)}, allow_val_change=True)
                logger.experiment.save(os.path.join(out_dir, "config.yaml"), base_path=out_dir, policy="now")


class OODCLI(LightningCLI):
    """LightningCLI for :class:`OODClassifier` and any :class:`OODDataModule`.

    ``data.num_classes`` is linked into ``model.num_classes``. After ``fit``, when an
    :class:`~lightning_ood.lightning.callback.OODEvaluation` callback is configured, the test
    stage runs on the trained weights so the run ends with the OOD report.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", SaveConfigToRun)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(OODClassifier, OODDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        instantiate_with_clear_errors(super().instantiate_classes)

    def before_fit(self) -> None:
        check_sync_batchnorm(self.trainer)
        if self.trainer.max_epochs == 0:
            rank_zero_warn("trainer.max_epochs is 0: nothing is trained, the report evaluates the initial weights")
        fix_run_directory_before_spawning(self.trainer)

    def after_fit(self) -> None:
        from lightning_ood.lightning.callback import OODEvaluation

        if any(isinstance(cb, OODEvaluation) for cb in self.trainer.callbacks):
            # the OOD report already gives the ID accuracy: no half-empty Lightning table
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)


class EvaluateCLI(LightningCLI):
    """``evaluate.py``: OOD evaluation without training.

    The model is an :class:`OODClassifier` (default; ``--ckpt_path`` restores trained
    weights, ``--model.pretrained`` loads a torchvision ResNet file) or any LightningModule
    class path, e.g. :class:`~lightning_ood.lightning.posthoc.PostHocClassifier` for a user's own
    ``nn.Module``. An :class:`~lightning_ood.lightning.callback.OODEvaluation` callback is added
    with its defaults when the config has none.
    """

    def __init__(self, args: Optional[list[str]] = None) -> None:
        super().__init__(
            pl.LightningModule, OODDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_callback=SaveConfigToRun, run=False, args=args,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="training checkpoint (.ckpt) of an OODClassifier to evaluate")
        parser.add_argument("--random_weights", type=bool, default=False,
                            help="evaluate a model that loads no weights (no --ckpt_path, pretrained or weights) "
                                 "on purpose, e.g. as a baseline")
        parser.set_defaults({"model": {"class_path": "lightning_ood.lightning.module.OODClassifier"}})
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        instantiate_with_clear_errors(super().instantiate_classes)

    def run(self) -> None:
        from lightning_ood.lightning.callback import OODEvaluation

        ckpt_path = self.config.get("ckpt_path")
        if ckpt_path:
            check_checkpoint_fits(ckpt_path, self.model)
        elif not self.config.get("random_weights"):
            check_brings_weights(self.model)
        if not any(isinstance(cb, OODEvaluation) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(OODEvaluation())
        fix_run_directory_before_spawning(self.trainer)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)


def check_sync_batchnorm(trainer: pl.Trainer) -> None:
    """Fail in the launching process, not inside every spawned worker, when SyncBatchNorm is
    asked for on CPUs (torch implements it for GPUs only)."""
    from pytorch_lightning.accelerators import CPUAccelerator

    # Lightning keeps the layer sync on multi-process strategies only (private attribute)
    if getattr(trainer.strategy, "_layer_sync", None) is not None and isinstance(trainer.accelerator, CPUAccelerator):
        raise ValueError("trainer.sync_batchnorm needs GPUs (torch's SyncBatchNorm has no CPU implementation): "
                         "drop --trainer.sync_batchnorm or train with --trainer.accelerator gpu")


def check_brings_weights(model: pl.LightningModule) -> None:
    """Refuse to evaluate (and export as deployable) randomly initialised weights: an
    :class:`OODClassifier` needs ``--ckpt_path`` or ``pretrained``, a ``PostHocClassifier``
    its ``weights`` file (or weights named in ``init_args``, e.g. torchvision's ``weights``)."""
    from lightning_ood.lightning.posthoc import PostHocClassifier

    hparams = getattr(model, "hparams", {})
    if isinstance(model, OODClassifier) and not hparams.get("pretrained"):
        raise ValueError("no weights to evaluate: pass --ckpt_path <training checkpoint> (or "
                         "--model.init_args.pretrained <torchvision state_dict file>); "
                         "--random_weights true evaluates the random initialisation on purpose")
    if isinstance(model, PostHocClassifier) and not hparams.get("weights") and not any(
            key in (hparams.get("init_args") or {}) for key in ("weights", "pretrained")):
        raise ValueError("no weights to evaluate: give the network's state_dict file with "
                         "--model.init_args.weights <file> (or weights/pretrained in its init_args); "
                         "--random_weights true evaluates the random initialisation on purpose")


def check_checkpoint_fits(path: str, model: pl.LightningModule) -> None:
    """Fail fast, with the differing settings named, when a training checkpoint does not
    belong to ``model``'s architecture or class count."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupted or not a torch file
        raise ValueError(f"{path} is not a readable Lightning checkpoint: {err}") from err
    saved = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning training checkpoint of lightning_ood (no hyper_parameters/state_dict)")
    keys = ("backbone", "loss", "num_classes", "width", "cifar_stem")
    differing = {k: (saved.get(k), model.hparams.get(k)) for k in keys if k in saved and saved.get(k) != model.hparams.get(k)}
    if differing:
        details = ", ".join(f"{k}: checkpoint {a!r} vs configured {b!r}" for k, (a, b) in differing.items())
        raise ValueError(f"{path} was trained with a different setup ({details}); "
                         "use the config the checkpoint was trained with (num_classes comes from the data)")


def use_wandb_offline_without_account() -> None:
    """Run W&B offline when no account is configured (no API key, no login, no mode)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = os.path.expanduser("~/.netrc")
    if os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read():
        return
    os.environ["WANDB_MODE"] = "offline"
    print("lightning_ood: no W&B account configured, logging offline (sync later with `wandb sync`)", file=sys.stderr)


def import_from_working_directory() -> None:
    """``python train.py`` puts the script's folder on ``sys.path``, not the working
    directory: add it (last, so it never shadows installed packages), so that a user's
    own ``mymodels.py`` next to their config can be named by class path."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def main(args: Optional[list[str]] = None) -> OODCLI:
    """Entry point of ``train.py``."""
    import_from_working_directory()
    use_wandb_offline_without_account()
    return OODCLI(args=args)


def evaluate_main(args: Optional[list[str]] = None) -> EvaluateCLI:
    """Entry point of ``evaluate.py``."""
    import_from_working_directory()
    use_wandb_offline_without_account()
    cli = EvaluateCLI(args=args)
    cli.run()
    return cli
