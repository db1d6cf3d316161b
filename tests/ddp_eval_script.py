"""A tiny, fully deterministic OOD evaluation shared by the evaluation tests.

Importable (the tests build on :class:`RandomOODDataModule` and :func:`run_evaluation`) and
runnable as a script, which is the way to exercise ``strategy="ddp"`` (that strategy
re-executes the command line once per rank, so it cannot run inside pytest)::

    python tests/ddp_eval_script.py --out /tmp/a --devices 1
    python tests/ddp_eval_script.py --out /tmp/b --devices 2 --strategy ddp

Every set has an odd number of samples (ID test 23, OOD 17 and 11, fit 41), so a
2-process test sampler pads every set with repeated samples.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import Any, Callable, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import TensorDataset

if __package__ in (None, ""):  # run as a script: make `lightning_ood` and `tests` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_ood.lightning.callback import OODEvaluation
from lightning_ood.data.base import IndexedDataset, OODDataModule, OODSet
from lightning_ood.lightning.module import OODClassifier

NUM_CLASSES = 3
SIZES = {"train": 41, "val": 5, "test": 23, "near_noise": 17, "far_blobs": 11}
DETECTORS = ("msp", "energy", "ash_s", "weiper", "feature_norm")


class RandomOODDataModule(OODDataModule):
    """3-class 16x16 random images: ID classes differ by their mean colour; ``near_noise`` is
    unshifted noise, ``far_blobs`` bright noise. Module-level so ``ddp_spawn`` can pickle it.

    Args:
        with_fit_set: ``False`` builds a datamodule without ID training data.
        sizes: overrides of :data:`SIZES`.
    """

    name = "random"
    num_classes = NUM_CLASSES
    image_size = 16

    def __init__(self, batch_size: int = 4, with_fit_set: bool = True, sizes: Optional[dict[str, int]] = None,
                 ood_sets: Optional[list[OODSet]] = None, seed: int = 0) -> None:
        if ood_sets is None:
            ood_sets = [OODSet("near_noise", "near"), OODSet("far_blobs", "far")]
        super().__init__("unused", False, batch_size, 0, SIZES["val"], ood_sets, seed)
        self.with_fit_set = with_fit_set
        self.sizes = {**SIZES, **(sizes or {})}

    def test_transform(self) -> Callable:
        """For OOD folders (PIL images); the generated sets are tensors already."""
        from torchvision import transforms as T

        return T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])

    def _id_set(self, n: int, generator: torch.Generator) -> TensorDataset:
        labels = torch.arange(n) % NUM_CLASSES
        shift = torch.tensor([[-1.0, 0.0, 1.0], [1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])[labels]
        images = torch.randn(n, 3, 16, 16, generator=generator) + shift[:, :, None, None]
        return TensorDataset(images, labels)

    def build(self) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed)
        train = self._id_set(self.sizes["train"], generator)
        val = self._id_set(self.sizes["val"], generator)
        test = self._id_set(self.sizes["test"], generator)
        return {
            "train": IndexedDataset(train),
            "fit": IndexedDataset(train) if self.with_fit_set else None,
            "val": IndexedDataset(val),
            "test": IndexedDataset(test),
            "train_labels": train.tensors[1],
        }

    def build_ood(self, spec: OODSet) -> IndexedDataset:
        if spec.path is not None:
            return super().build_ood(spec)
        generator = torch.Generator().manual_seed(1000 + sum(map(ord, spec.name)))
        n = self.sizes[spec.name]
        scale = 3.0 if spec.name.startswith("far") else 1.0
        images = scale * torch.randn(n, 3, 16, 16, generator=generator)
        return IndexedDataset(TensorDataset(images, torch.zeros(n, dtype=torch.long)), ood=True)


class PaddedRandomOODDataModule(RandomOODDataModule):
    """:class:`RandomOODDataModule` with plain evaluation loaders, so under several processes
    Lightning injects its default (padded) ``DistributedSampler``: with odd set sizes, some
    samples reach the callback twice and its de-duplication has real work to do."""

    def _eval_loader(self, dataset):
        return self._loader(dataset)


class SampleCounter(pl.Callback):
    """Writes ``samples_rank<r>.json`` into ``folder``: the number of test samples each
    dataloader delivered to this rank (duplicates included)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.counts: dict[int, int] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.counts[dataloader_idx] = self.counts.get(dataloader_idx, 0) + len(batch[0])

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import json

        with open(os.path.join(self.folder, f"samples_rank{trainer.global_rank}.json"), "w") as f:
            json.dump([self.counts.get(i, 0) for i in range(len(self.counts))], f)


class FlatMLP(torch.nn.Module):
    """A user's own classifier whose penultimate features are a plain Linear output (no
    ReLU, so they can be negative): ``flatten -> hidden (Linear) -> fc (Linear)``."""

    def __init__(self, in_features: int = 3 * 16 * 16, hidden: int = 64, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.flatten = torch.nn.Flatten()
        self.hidden = torch.nn.Linear(in_features, hidden)
        self.fc = torch.nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.flatten(x)))


def make_model(loss: str = "ce", seed: int = 0) -> OODClassifier:
    """A tiny OODClassifier whose weights depend on ``seed`` only."""
    torch.manual_seed(seed)
    return OODClassifier(width=8, num_classes=NUM_CLASSES, loss=loss)


def make_callback(**kwargs: Any) -> OODEvaluation:
    """OODEvaluation without plots, fitting on every training image, with published detector
    defaults (no hyper-parameter tuning) and no exported checkpoint: the tests here check the
    evaluation itself. Options this version of OODEvaluation lacks (``tune``,
    ``save_checkpoint``) are dropped."""
    options = dict(plots=False, fit_samples=None, tune="defaults", save_checkpoint=False)
    options.update(kwargs)
    accepted = inspect.signature(OODEvaluation).parameters
    return OODEvaluation(**{k: v for k, v in options.items() if k in accepted or k in kwargs})


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    kwargs.update(overrides)
    return kwargs


def run_evaluation(output_dir: str, devices: int = 1, strategy: str = "auto", loss: str = "ce",
                   detectors: Optional[Sequence[str]] = DETECTORS, weights: Optional[str] = None,
                   callbacks: Sequence[pl.Callback] = (), datamodule: Optional[OODDataModule] = None,
                   **options: Any) -> tuple[pl.Trainer, OODEvaluation]:
    """``trainer.test`` with :func:`make_callback` (``options`` passed on) on
    :class:`RandomOODDataModule`; the model is :func:`make_model` or the state_dict file
    ``weights``. Returns the trainer and the OODEvaluation callback (in this process)."""
    model = make_model(loss)
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    callback = make_callback(detectors=list(detectors) if detectors is not None else None,
                             output_dir=output_dir, **options)
    trainer = pl.Trainer(**trainer_kwargs(devices=devices, strategy=strategy, callbacks=[callback, *callbacks]))
    trainer.test(model, datamodule=datamodule if datamodule is not None else RandomOODDataModule())
    return trainer, callback


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    parser.add_argument("--weights", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    run_evaluation(args.out, args.devices, args.strategy, args.loss, args.detectors, args.weights)


if __name__ == "__main__":
    main()
