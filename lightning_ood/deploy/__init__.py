"""One file that answers "which class, and is this input familiar?" — plain torch, no
Lightning needed to serve a model.

Train once, evaluate once (``OODEvaluation`` writes ``model_with_detectors.ckpt`` next to
its report), deploy one file::

    import lightning_ood
    model = lightning_ood.load("model_with_detectors.ckpt")
    out = model(model.preprocess(images))   # {"logits", "scores", "is_ood"}

* :func:`save_with_detectors` (:mod:`~lightning_ood.deploy.save`) writes a network with
  its fitted detectors, preprocessing and per-detector thresholds as tensors and plain
  values only (:mod:`~lightning_ood.deploy.format`): it loads with
  ``torch.load(path, weights_only=True)`` and never unpickles code. Writes are atomic.
* :func:`load` (:mod:`~lightning_ood.deploy.load`) rebuilds it as an :class:`OODModel`
  (:mod:`~lightning_ood.deploy.model`) and raises :class:`CheckpointError` naming the
  problem and the fix for files that are truncated, corrupted, not ours, too new or that
  do not fit their config.
* :func:`export_program` (:mod:`~lightning_ood.deploy.program`) writes a ``torch.export``
  program (``.pt2``, dynamic batch); also ``python -m lightning_ood.deploy CKPT --out m.pt2``.
"""
from lightning_ood.deploy.format import CHECKPOINT_NAME, FORMAT, FORMAT_VERSION, PROGRAM_NAME, CheckpointError
from lightning_ood.deploy.load import load
from lightning_ood.deploy.model import OODModel, preprocessing_from_datamodule
from lightning_ood.deploy.program import export_program, load_program
from lightning_ood.deploy.save import save_with_detectors

__all__ = [
    "CHECKPOINT_NAME", "FORMAT", "FORMAT_VERSION", "PROGRAM_NAME", "CheckpointError", "OODModel", "export_program",
    "load", "load_program", "preprocessing_from_datamodule", "save_with_detectors",
]
