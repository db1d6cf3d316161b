"""Where a run writes its files."""
from __future__ import annotations

import os

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger


def run_directory(trainer: pl.Trainer) -> str:
    """The run's own output folder, identical on every rank.

    **A collective**: under several processes it broadcasts rank 0's answer (only rank 0
    knows the W&B run id; ``trainer.log_dir`` broadcasts too), so every rank must call it,
    and rank-0-only code must use a value computed before (see ``lightning_ood/distributed.py``).

    With W&B: ``<save_dir>/<project>/<run id>`` (the run id differs per run, so runs never
    overwrite each other); with other loggers their versioned ``log_dir``; without a
    logger ``default_root_dir``.
    """
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        path = None
        if trainer.is_global_zero:
            path = os.path.join(logger.save_dir or ".", str(logger.name or "lightning_ood"), str(logger.version))
        return trainer.strategy.broadcast(path)
    if logger is None:
        return os.path.join(trainer.default_root_dir, "results")
    return trainer.log_dir or trainer.default_root_dir
