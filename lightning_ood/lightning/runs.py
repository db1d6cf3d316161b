"""Where a run writes its files."""
from __future__ import annotations

import os
import time
import uuid
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

#: The trainer attribute that caches a run's folder (pickled with the trainer by ddp_spawn).
RUN_DIRECTORY_ATTRIBUTE = "_lightning_ood_run_directory"


def run_directory(trainer: pl.Trainer) -> str:
    """The run's own output folder, identical on every rank and for every stage of one trainer.

    With W&B: ``<save_dir>/<project>/<run id>``; with other loggers their versioned
    ``log_dir``; without a logger a new ``<default_root_dir>/results/<time>-<id>`` per
    trainer. Runs never overwrite each other.

    **A collective**: under several processes it broadcasts rank 0's answer (only rank 0
    knows the W&B run id; ``trainer.log_dir`` broadcasts too), so every rank must call it,
    and rank-0-only code must use a value computed before (see ``lightning_ood/distributed.py``).
    """
    cached: Optional[str] = getattr(trainer, RUN_DIRECTORY_ATTRIBUTE, None)
    if cached is not None:
        return cached
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        path = None
        if trainer.is_global_zero:
            path = os.path.join(logger.save_dir or ".", str(logger.name or "lightning_ood"), str(logger.version))
        path = trainer.strategy.broadcast(path)
    elif logger is None:
        path = trainer.strategy.broadcast(new_results_folder(trainer.default_root_dir) if trainer.is_global_zero else None)
    else:
        path = trainer.log_dir or trainer.default_root_dir
    setattr(trainer, RUN_DIRECTORY_ATTRIBUTE, path)
    return path


def new_results_folder(root: str) -> str:
    """A fresh ``<root>/results/<YYYYmmdd-HHMMSS>-<6 hex>`` path (not created)."""
    return os.path.join(root, "results", f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")


def fix_run_directory_before_spawning(trainer: pl.Trainer) -> None:
    """``ddp_spawn`` runs fit and test in separate worker processes with copies of the
    trainer: choose a logger-less run's folder here, in the launching process, so that both
    stages (config.yaml and the report) share it. W&B and versioned loggers need nothing."""
    from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if trainer.logger is None and isinstance(launcher, _MultiProcessingLauncher) \
            and getattr(trainer, RUN_DIRECTORY_ATTRIBUTE, None) is None:
        setattr(trainer, RUN_DIRECTORY_ATTRIBUTE, new_results_folder(trainer.default_root_dir))
