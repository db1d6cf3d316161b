"""OODEvaluation: attach post-hoc detectors at test time and report OOD metrics.

Data flow: images -> model (one forward pass) -> ForwardOutputs -> every detector's score
-> per-sample (index, label, scores) gathered across ranks -> padded duplicates dropped ->
metrics per detector x OOD set -> table / JSON / CSV / W&B / plots.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchmetrics.utilities.distributed import gather_all_tensors
from tqdm.auto import tqdm

from lightning_ood import distributed
from lightning_ood.checks import check_number
from lightning_ood.data.base import OODDataModule, OODSet
from lightning_ood.detectors import (
    Detector, FitData, ForwardOutputs, build_detector, default_detector_names, detector_name, detector_names, entry,
)
from lightning_ood.detectors.functional import jigsaw
from lightning_ood.evaluation.report import build_results, write_report
from lightning_ood.lightning.runs import run_directory
from lightning_ood.nn.objectives import native_score
from lightning_ood.evaluation.tuning import TUNING_MODES, TuningData, concat_outputs, is_tunable, tune_detectors


def dataset_family(datamodule: OODDataModule) -> str:
    """Which published defaults fit the ID data: ``cifar10``, ``cifar100`` or ``imagenet``."""
    if datamodule.name in ("cifar10", "cifar100"):
        return datamodule.name
    return "imagenet" if datamodule.image_size > 64 else "cifar10"


class OODEvaluation(pl.Callback):
    """Evaluates post-hoc OOD detectors during ``trainer.test``.

    The datamodule must be an :class:`~lightning_ood.data.OODDataModule`: test dataloader 0
    is the ID test set, the others its OOD sets. Detectors that need ID statistics are
    fitted first with one streamed, rank-sharded pass over (a class-balanced subset of)
    the ID training images. Every test batch goes through the model once; all detectors
    read that pass. The fitted detectors are stored in ``pl_module.detectors`` so
    checkpoints carry them.

    Args:
        detectors: registered names (``msp``, ``energy``, ``ash_s``, ``weiper``,
            ``feature_norm`` ...; :func:`lightning_ood.detectors.detector_names`), ``all``
            for every registered detector, or Detector instances (YAML
            ``class_path``/``init_args``). ``None``: the registry's defaults (MSP, MaxLogit,
            Energy, ASH-P/B/S, WeiPer, FeatureNorm) and the loss's native score (MDS for
            ``isomax_plus``, the penultimate norm for ``l2_norm``).
        fit_samples: ID training images used to fit detectors (class-balanced subset;
            ``None`` = all).
        jigsaw_seed: seed of the jigsaw permutations (FeatureNorm's NormRatio).
        fpr95_positive: ``ood`` (OpenOOD convention, default) or ``id`` (ASH/FeatureNorm
            papers).
        output_dir: where results.json/csv and plots go (default: the run directory).
        plots: save score histograms and ROC curves as PNGs (and log them to W&B).
        keep_id_fraction: per-detector thresholds stored in the results keep this fraction
            of the ID test samples (score >= threshold = ID).
        tune: how ASH's percentile and WeiPer's hyper-parameters are chosen:
            ``jigsaw`` (default: held-out ID validation images vs their jigsaw versions),
            ``ood_val`` (against ``ood_val_sets``, OpenOOD's protocol) or ``defaults``
            (the published values, for reproducing papers). Never uses the test sets.
        tune_samples: at most this many ID validation images are used for tuning.
        ood_val_sets: OOD validation sets for ``tune="ood_val"`` (never the test sets).
        tuning_grids: detector name -> grid overrides, e.g.
            ``{"weiper": {"delta": [1.2, 1.8]}}`` (each detector class declares its own
            grid; see its ``tuning_grid``).
        ash_percentiles: shortcut for the ``percentile`` grid of ``ash_p``/``ash_b``/``ash_s``
            (0-100 scale).
        weiper_grid: shortcut for ``tuning_grids["weiper"]``.
        save_checkpoint: write ``<output_dir>/model_with_detectors.ckpt`` (rank 0): the model,
            its fitted detectors, preprocessing and thresholds in one file for
            ``lightning_ood.load`` (also logged as a W&B artifact when W&B is the logger);
            for a ``PostHocClassifier``, the ``torch.export`` program
            ``model_with_detectors.pt2`` instead.
    """

    def __init__(
        self,
        detectors: Union[list[Union[str, Detector]], str, None] = None,
        fit_samples: Optional[int] = 5000,
        jigsaw_seed: int = 0,
        fpr95_positive: str = "ood",
        output_dir: Optional[str] = None,
        plots: bool = True,
        keep_id_fraction: float = 0.95,
        tune: str = "jigsaw",
        tune_samples: Optional[int] = 1000,
        ood_val_sets: Optional[list[OODSet]] = None,
        tuning_grids: Optional[dict[str, dict[str, list[Any]]]] = None,
        ash_percentiles: Optional[Sequence[float]] = None,
        weiper_grid: Optional[dict[str, list[float]]] = None,
        save_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        if fpr95_positive not in ("ood", "id"):
            raise ValueError(f"fpr95_positive must be 'ood' or 'id', got {fpr95_positive!r}")
        if isinstance(detectors, str) or (detectors is not None and list(detectors) == ["all"]):
            if detectors not in ("all", ["all"]):
                raise ValueError(f"detectors must be a list of names, 'all' or omitted; got {detectors!r}")
            detectors = list(detector_names())
        for d in detectors or []:
            if isinstance(d, str):
                build_detector(d)  # fail fast on unknown names, listing the valid ones
            elif not isinstance(d, Detector):
                raise TypeError(f"detectors must be names ({', '.join(detector_names())}) or Detector instances, got {d!r}")
        if detectors is not None and not detectors:
            rank_zero_warn("OODEvaluation(detectors=[]): no detector is attached, the report holds only the ID "
                           "accuracy; omit `detectors` for the default list")
        check_number("fit_samples", fit_samples, 1, integer=True, optional=True)
        check_number("tune_samples", tune_samples, 1, integer=True, optional=True)
        check_number("jigsaw_seed", jigsaw_seed, 0, integer=True)
        for percentile in ash_percentiles or ():
            # (0, 1] is almost always a fraction meant as a percentage (0.9 for 90)
            check_number("each of ash_percentiles (a 0-100 scale: 90 means 90 %)", percentile, 1, 100,
                         low_open=True, high_open=True)
        self.tuning_grids = _tuning_grids(tuning_grids, ash_percentiles, weiper_grid)
        self.detector_specs = list(detectors) if detectors is not None else None
        self.fit_samples = fit_samples
        self.jigsaw_seed = jigsaw_seed
        self.fpr95_positive = fpr95_positive
        self.output_dir = output_dir
        self.plots = plots
        if not 0 < keep_id_fraction <= 1:
            raise ValueError(f"keep_id_fraction must be in (0, 1], got {keep_id_fraction}")
        self.keep_id_fraction = keep_id_fraction
        if tune not in TUNING_MODES:
            raise ValueError(f"tune must be one of {', '.join(TUNING_MODES)}, got {tune!r}")
        if tune == "ood_val" and not ood_val_sets:
            raise ValueError("tune='ood_val' needs ood_val_sets (OOD validation sets, never the test sets)")
        self.tune = tune
        self.tune_samples = tune_samples
        self.ood_val_sets = [v if isinstance(v, OODSet) else OODSet(**v) for v in (ood_val_sets or [])]
        self.save_checkpoint = save_checkpoint
        self.checkpoint_path: Optional[str] = None
        self.tuning: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.results: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Checked before ``fit`` too: a missing OOD folder or a wrong detector name must
        # fail before hours of training, not in the test stage that follows them.
        if stage not in ("fit", "test"):
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, OODDataModule):
            if stage == "fit":  # training with plain dataloaders is fine; the evaluation needs more
                rank_zero_warn("OODEvaluation runs in trainer.test with an OODDataModule (ID test set + OOD "
                               "sets); this fit has none, so its OOD sets cannot be checked now")
                return
            raise TypeError("OODEvaluation needs an OODDataModule (ID test set + OOD sets) passed to trainer.test")
        datamodule.setup("test")
        if not datamodule.ood_test_sets:
            raise ValueError("the datamodule declares no OOD sets: add data.ood_sets (name/path and near/far group)")
        # built now, so a missing OOD validation folder fails before any compute as well
        self._ood_val_datasets = []
        if self.tune == "ood_val":
            self._ood_val_datasets = [(spec.name, datamodule.build_ood(spec)) for spec in self.ood_val_sets]
        if stage == "test":
            groups = datamodule.ood_groups()
            rank_zero_info(f"ID test set {datamodule.name}: {len(datamodule.test_set)} images")
            for name, dataset in datamodule.ood_test_sets.items():
                rank_zero_info(f"OOD set {name}: {len(dataset)} images ({groups[name]})")
        specs = self.detector_specs
        if specs is None:
            specs = default_detector_names()
            native = native_score(pl_module.hparams.get("loss"))
            if native:
                specs.append(native)
        family = dataset_family(datamodule)
        head, num_blocks = pl_module.head, pl_module.backbone.num_blocks
        self.skipped, self._to_attach, self._configured = {}, {}, set()
        for spec in specs:
            detector = build_detector(spec, family) if isinstance(spec, str) else spec
            name = detector_name(detector)
            if not isinstance(spec, str):
                self._configured.add(name)  # its hyper-parameters are the user's, not the paper's
            if name in self._to_attach or name in self.skipped:
                raise ValueError(f"detector {name!r} is configured twice")
            reason = detector.skip_reason(head, num_blocks)
            if reason is not None:
                self.skipped[name] = reason
            else:
                self._to_attach[name] = detector
        needs_fit = [n for n, d in self._to_attach.items() if d.requires_fit]
        if needs_fit and datamodule.fit_set is None:
            raise ValueError(f"detectors {', '.join(needs_fit)} need ID training statistics, "
                             "but the datamodule has no training set")
        self._datamodule = datamodule

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        self.timing: dict[str, float] = {}
        # Attached here, after Lightning restored any ckpt_path (detectors are not in a
        # training checkpoint), outside inference mode so their buffers stay writable.
        with torch.inference_mode(False):
            for detector in self._to_attach.values():
                detector.attach(pl_module.head, pl_module.backbone.num_blocks)
            pl_module.detectors.clear()
            pl_module.detectors.update(self._to_attach)
            pl_module.detectors.to(pl_module.device)
        to_fit = [d for d in pl_module.detectors.values() if d.requires_fit]
        self._buffers: list[dict[str, list[Tensor]]] = [
            {"indices": [], "labels": [], "scores": [], "predictions": []} for _ in self._loader_names()
        ]
        self._min_feature = torch.tensor(float("inf"), device=pl_module.device)
        fit_data = None
        if to_fit:
            fit_data = self._fit_pass(trainer, pl_module, need_jigsaw=any(d.requires_jigsaw for d in to_fit))
            with torch.inference_mode(False):
                for detector in to_fit:
                    detector.fit(fit_data)
        fitted = time.perf_counter()
        self.timing["fit_s"] = fitted - started
        self.tuning = {}
        tunable = [d for d in pl_module.detectors.values() if is_tunable(d)]
        if self.tune != "defaults" and tunable:
            data = self._tuning_data(trainer, pl_module)
            if data is None:
                self.tuning = {detector_name(d): {"mode": "defaults", "note": "no ID validation images "
                               "(data val_size is 0): published defaults kept"} for d in tunable}
            else:
                with torch.inference_mode(False):
                    self.tuning = tune_detectors(tunable, data, fit_data, self.tuning_grids)
        elif tunable:
            self.tuning = {detector_name(d): {"mode": "defaults", "values": "configured" if detector_name(d)
                           in self._configured else "published"} for d in tunable}
        self._test_started = time.perf_counter()
        self.timing["tuning_s"] = self._test_started - fitted

    def _forward_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: Any, desc: str,
                     jigsaw_too: bool = False) -> tuple[ForwardOutputs, Optional[ForwardOutputs]]:
        """Every rank runs the whole (small) dataset, so all ranks tune identically."""
        loader = DataLoader(dataset, batch_size=self._datamodule.batch_size, shuffle=False)
        plain, shuffled = [], []
        # the test pass's precision (input dtype, autocast), so tuning sees test-time features
        with torch.inference_mode(), trainer.precision_plugin.forward_context():
            for images, _, indices in tqdm(loader, desc=desc, disable=not trainer.is_global_zero
                                           or not trainer.progress_bar_callback):
                images = trainer.precision_plugin.convert_input(images.to(pl_module.device))
                plain.append(pl_module.forward_outputs(images))
                if jigsaw_too:
                    shuffled.append(pl_module.forward_outputs(self._jigsaw(images, indices)))
        return concat_outputs(plain), (concat_outputs(shuffled) if jigsaw_too else None)

    def _tuning_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[TuningData]:
        """Cached outputs of ID validation images and their jigsaw versions (or the OOD
        validation sets): one forward pass, reused by every grid point."""
        val_set = self._datamodule.val_set
        if val_set is None or len(val_set) == 0:
            return None
        n = len(val_set) if self.tune_samples is None else min(self.tune_samples, len(val_set))
        subset = Subset(val_set, range(n))
        if self.tune == "jigsaw":
            id_outputs, jig = self._forward_all(trainer, pl_module, subset, "Tuning: ID validation + jigsaw",
                                                jigsaw_too=True)
            return TuningData(id_outputs, jig, "jigsaw", f"{n} ID validation images (held out from training) "
                              "vs their jigsaw versions")
        id_outputs, _ = self._forward_all(trainer, pl_module, subset, "Tuning: ID validation")
        ood = [self._forward_all(trainer, pl_module, dataset, f"Tuning: {name}")[0]
               for name, dataset in self._ood_val_datasets]
        ood_outputs = concat_outputs(ood)
        names = ", ".join(spec.name for spec in self.ood_val_sets)
        return TuningData(id_outputs, ood_outputs, "ood_val",
                          f"{n} ID validation images vs {len(ood_outputs.logits)} OOD validation images ({names})")

    def _loader_names(self) -> list[str]:
        return [self._datamodule.name] + list(self._datamodule.ood_test_sets)

    def _fit_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule, need_jigsaw: bool) -> FitData:
        """One streamed pass over this rank's shard of the ID training subset."""
        loader = self._datamodule.fit_dataloader(self.fit_samples)
        need_blocks = any(d.requires_block_norms for d in pl_module.detectors.values())
        need_labels = any(d.requires_labels for d in pl_module.detectors.values())
        features, block_norms, jigsaw_norms, labels, logits = [], [], [], [], []
        with torch.inference_mode(), trainer.precision_plugin.forward_context():
            for images, targets, indices in tqdm(loader, desc="Fitting detectors on ID training data",
                                                 disable=not trainer.is_global_zero or not trainer.progress_bar_callback):
                images = trainer.precision_plugin.convert_input(images.to(pl_module.device))
                outputs = pl_module.forward_outputs(images, with_block_norms=need_blocks)
                features.append(outputs.features)
                logits.append(outputs.logits)
                if need_labels:
                    labels.append(targets.to(pl_module.device))
                if outputs.block_norms is not None:
                    block_norms.append(outputs.block_norms)
                if need_jigsaw:
                    shuffled = self._jigsaw(images, indices)
                    jigsaw_norms.append(pl_module.forward_outputs(shuffled, with_block_norms=True).block_norms)
        width = pl_module.backbone.num_features
        blocks = pl_module.backbone.num_blocks
        cat = lambda xs, shape: torch.cat(xs).clone() if xs else torch.zeros(shape, device=pl_module.device)
        return FitData(
            features=cat(features, (0, width)),
            block_norms=cat(block_norms, (0, blocks)) if need_blocks else None,
            jigsaw_block_norms=cat(jigsaw_norms, (0, blocks)) if need_jigsaw else None,
            labels=(torch.cat(labels).clone() if labels else torch.zeros(0, dtype=torch.long, device=pl_module.device))
            if need_labels else None,
            logits=cat(logits, (0, pl_module.num_classes)),
        )

    def _jigsaw(self, images: Tensor, indices: Tensor) -> Tensor:
        """Jigsaw versions of normalised images, each permutation seeded by the sample's
        index, so 1 or N ranks shuffle every image identically. The border left over by the
        tiles is 0 in normalised space (the dataset's mean colour)."""
        shuffled = [
            jigsaw(image[None], generator=torch.Generator(device=images.device).manual_seed(
                self.jigsaw_seed * 1_000_003 + int(index)))
            for image, index in zip(images, indices)
        ]
        return torch.cat(shuffled)

    # -------------------------------------------------------------- test pass
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        forward = outputs["outputs"]
        self._min_feature = torch.minimum(self._min_feature, forward.features.min())
        scores, predictions = [], [forward.logits.argmax(1)]
        for detector in pl_module.detectors.values():
            scores.append(detector(forward).float())
            if detector.changes_logits and dataloader_idx == 0:
                predictions.append(detector.shaped_logits(forward).argmax(1))
        buffer = self._buffers[dataloader_idx]
        buffer["indices"].append(outputs["indices"])
        buffer["labels"].append(outputs["labels"])
        buffer["scores"].append(torch.stack(scores, 1) if scores else forward.logits.new_zeros(len(forward.logits), 0))
        if dataloader_idx == 0:
            buffer["predictions"].append(torch.stack(predictions, 1))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = [detector_name(d) for d in pl_module.detectors.values()]
        per_set = [self._gather(buffer) for buffer in self._buffers]
        expected = [len(self._datamodule.test_set)] + [len(d) for d in self._datamodule.ood_test_sets.values()]
        for set_name, data, n in zip(self._loader_names(), per_set, expected):
            if len(data["indices"]) != n:
                raise RuntimeError(f"{set_name}: gathered {len(data['indices'])} distinct samples, dataset has {n}")
        keep = list(range(len(names)))
        # every rank takes part in this reduction, so all ranks skip the same detectors
        min_feature = float(distributed.all_reduce(self._min_feature, "min"))
        if min_feature < 0:
            detectors = list(pl_module.detectors.values())
            for i, name in enumerate(names):
                if detectors[i].assumes_nonnegative_features:
                    self.skipped[name] = (f"features can be negative (min {min_feature:.3g}); {name} assumes "
                                          "post-ReLU features")
            keep = [i for i in keep if not detectors[i].assumes_nonnegative_features]
        self.results = build_results(
            id_name=self._datamodule.name,
            set_names=self._loader_names(),
            groups=self._datamodule.ood_groups(),
            per_set=per_set,
            detector_names=names,
            kept=keep,
            changes_logits=[d.changes_logits for d in pl_module.detectors.values()],
            skipped=self.skipped,
            detector_info={n: d.describe() for n, d in zip(names, pl_module.detectors.values())},
            fpr95_positive=self.fpr95_positive,
            devices=trainer.world_size,
        )
        self.results["tuning"] = self.tuning
        self.timing["test_s"] = time.perf_counter() - self._test_started
        self.results["timing"] = {key: round(value, 3) for key, value in self.timing.items()}
        self.results["thresholds"] = {
            names[i]: id_threshold(per_set[0]["scores"][:, i], self.keep_id_fraction) for i in keep
        }
        output_dir = self.output_dir or run_directory(trainer)
        self.output_dir_used = output_dir
        if trainer.is_global_zero:
            write_report(self.results, per_set, self._loader_names(), names, keep, output_dir,
                         plots=self.plots, loggers=trainer.loggers)
        for i, name in enumerate(names):  # skipped detectors are not carried into checkpoints
            if i not in keep:
                del pl_module.detectors[name]
        if self.save_checkpoint and trainer.is_global_zero:
            from lightning_ood.lightning.artifacts import save_after_evaluation

            self.checkpoint_path = save_after_evaluation(trainer, pl_module, output_dir, self.results["thresholds"])

    @staticmethod
    def _gather(buffer: dict[str, list[Tensor]]) -> dict[str, Tensor]:
        """Concatenate, gather across ranks, drop padded duplicates, sort by index."""
        out = {}
        for key, chunks in buffer.items():
            if not chunks:
                continue
            local = torch.cat(chunks)
            out[key] = torch.cat(gather_all_tensors(local)) if distributed.is_distributed() else local
        order = torch.argsort(out["indices"], stable=True)
        sorted_indices = out["indices"][order]
        first = torch.ones_like(sorted_indices, dtype=torch.bool)
        first[1:] = sorted_indices[1:] != sorted_indices[:-1]
        return {key: value[order][first].cpu() for key, value in out.items()}


def id_threshold(id_scores: Tensor, keep_fraction: float = 0.95) -> float:
    """The score threshold that keeps ``keep_fraction`` of ID samples (score >= threshold
    counts as ID): the largest t with at least ``keep_fraction`` of ID scores >= t."""
    ordered = torch.sort(id_scores.double(), descending=True).values
    position = max(math.ceil(keep_fraction * len(ordered) - 1e-9) - 1, 0)
    return float(ordered[position])


def _tuning_grids(grids: Optional[dict[str, dict[str, list[Any]]]], ash_percentiles: Optional[Sequence[float]],
                  weiper_grid: Optional[dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
    """``tuning_grids`` with the two shortcuts merged in, keys checked against each
    detector class's own grid (so a typo fails when the callback is built)."""
    merged: dict[str, dict[str, list[Any]]] = {}
    for name, grid in (grids or {}).items():
        if not isinstance(grid, dict):
            raise ValueError(f"tuning_grids[{name!r}] must map hyper-parameter names to lists of values, got {grid!r}")
        merged[entry(name).name] = dict(grid)
    if ash_percentiles is not None:
        for name in ("ash_p", "ash_b", "ash_s"):
            merged.setdefault(name, {})["percentile"] = list(ash_percentiles)
    if weiper_grid is not None:
        merged.setdefault("weiper", {}).update(weiper_grid)
    for name, grid in merged.items():
        label = "weiper_grid" if name == "weiper" and weiper_grid is not None else f"tuning_grids[{name!r}]"
        valid = entry(name).cls.tuning_grid
        for key, values in grid.items():
            if key not in valid:
                raise ValueError(f"unknown {label} key {key!r}; valid keys: {', '.join(valid) or 'none (not tunable)'}")
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"{label}[{key!r}] must be a non-empty list of values, got {values!r}")
    return merged
