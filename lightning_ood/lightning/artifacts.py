"""After an evaluation: the model file (or ``.pt2`` for a user's network) next to the
report, logged as a W&B artifact."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from lightning_ood.deploy.format import CHECKPOINT_NAME, CheckpointError, FORMAT, FORMAT_VERSION, PROGRAM_NAME, first_line
from lightning_ood.deploy.model import OODModel, preprocessing_from_datamodule
from lightning_ood.deploy.program import export_program
from lightning_ood.deploy.save import save_with_detectors
from lightning_ood.lightning.posthoc import PostHocClassifier


def save_after_evaluation(trainer: Any, pl_module: pl.LightningModule, output_dir: str,
                          thresholds: Optional[Mapping[str, float]]) -> Optional[str]:
    """Write ``<output_dir>/model_with_detectors.ckpt`` — or, for a ``PostHocClassifier``,
    the ``torch.export`` program ``model_with_detectors.pt2`` — (rank 0 only; called by
    ``OODEvaluation``) and log it as a W&B artifact when a ``WandbLogger`` is attached.
    A model that cannot be saved (e.g. a custom detector class, a network that does not
    export) gives a warning, not an error."""
    datamodule = getattr(trainer, "datamodule", None)
    preprocessing = preprocessing_from_datamodule(datamodule) if datamodule is not None else None
    detectors = list(pl_module.detectors)
    if isinstance(pl_module, PostHocClassifier):
        path = os.path.join(output_dir, PROGRAM_NAME)
        try:
            detectors = export_program(OODModel(pl_module, thresholds, preprocessing), path)["exported"]
        except Exception as err:  # the user's network may not trace: the report stands without it
            rank_zero_warn(f"OODEvaluation: {PROGRAM_NAME} not written: {first_line(err)}")
            return None
    else:
        path = os.path.join(output_dir, CHECKPOINT_NAME)
        try:
            save_with_detectors(pl_module, path, preprocessing, thresholds)
        except CheckpointError as err:
            rank_zero_warn(f"OODEvaluation: {CHECKPOINT_NAME} not written: {err}")
            return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            log_artifact(logger.experiment, path, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "detectors": detectors,
                "thresholds": {n: t for n, t in (thresholds or {}).items() if n in detectors},
            })
    return path


def log_artifact(run: Any, path: str, metadata: Optional[dict[str, Any]] = None) -> None:
    """Log a model file to a W&B run as a ``model`` artifact (alias ``latest``)."""
    import wandb

    run_id = str(getattr(run, "id", None) or "run")
    artifact = wandb.Artifact(
        name=f"model-with-detectors-{run_id}", type="model", metadata=metadata or {},
        description="lightning_ood model with its fitted OOD detectors: " + (
            "lightning_ood.deploy.load_program(path)" if path.endswith(".pt2") else "lightning_ood.load(path)"),
    )
    artifact.add_file(path, name=os.path.basename(path))
    run.log_artifact(artifact, aliases=["latest"])
