"""OODEvaluation: attach post-hoc detectors at test time and report OOD metrics.

Data flow: images -> model (one forward pass) -> ForwardOutputs -> every detector's score
-> per-sample (index, label, scores) gathered across ranks -> padded duplicates dropped ->
metrics per detector x OOD set -> table / JSON / CSV / W&B / plots.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from lightning_ood import distributed
from lightning_ood.checks import check_number
from lightning_ood.data.base import OODDataModule, OODSet
from lightning_ood.detectors import (
    Detector, ForwardOutputs, build_detector, default_detector_names, detector_name, detector_names, entry,
    reads_block_norms,
)
from lightning_ood.detectors.functional import finite_inputs_checked
from lightning_ood.evaluation.metrics import id_threshold
from lightning_ood.evaluation.report import build_results, write_report
from lightning_ood.evaluation.runner import (
    ScoreCollector, default_tuning_report, drop_negative_feature_detectors, fit_pass, forward_all, resolve_detectors,
)
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
        tune: how the hyper-parameters of detectors with a ``tuning_grid`` (ASH's percentile,
            WeiPer's delta/lambdas/widths, KNN's k, ...) are chosen:
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
        resolved = resolve_detectors(specs, dataset_family(datamodule), pl_module.head, pl_module.backbone.num_blocks)
        self.skipped, self._to_attach, self._configured = resolved.skipped, resolved.to_attach, resolved.configured
        if stage == "test" and hasattr(pl_module, "check_forward") and len(datamodule.test_set) > 0:
            # one dry forward pass (no collective) before any compute: a wrong feature width,
            # head or block spec fails now, not after the fitting pass
            images = torch.stack([datamodule.test_set[i][0] for i in range(min(2, len(datamodule.test_set)))])
            pl_module.check_forward(images, reads_block_norms(self._to_attach.values()))
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
        self._collector = ScoreCollector(len(self._loader_names()), pl_module.device)
        fit_data = None
        if to_fit:
            loader = self._datamodule.fit_dataloader(self.fit_samples)
            with self._forward_context(trainer):
                fit_data = fit_pass(self._progress(trainer, loader, "Fitting detectors on ID training data"),
                                    self._prepare(trainer, pl_module), pl_module.forward_outputs, to_fit,
                                    self.jigsaw_seed, pl_module.backbone.num_features, pl_module.backbone.num_blocks,
                                    pl_module.num_classes, pl_module.device)
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
                self.tuning = default_tuning_report(tunable, self._configured, "no ID validation images "
                                                    "(data val_size is 0): published defaults kept")
            else:
                with torch.inference_mode(False):
                    self.tuning = tune_detectors(tunable, data, fit_data, self.tuning_grids)
        elif tunable:
            self.tuning = default_tuning_report(tunable, self._configured)
        self._test_started = time.perf_counter()
        self.timing["tuning_s"] = self._test_started - fitted

    @staticmethod
    def _describe(detector: Detector, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The detector's report entry, with the module name of a selected block (the
        block-norm columns are the network's ``block_names``, in order)."""
        info = detector.describe()
        names = getattr(pl_module, "block_names", None)
        selected = info.get("selected_block")
        if names and isinstance(selected, int) and 0 <= selected < len(names):
            info["selected_block_name"] = names[selected]
        return info

    @staticmethod
    def _forward_context(trainer: pl.Trainer) -> contextlib.ExitStack:
        """No autograd, and the test pass's precision (autocast), so fitting and tuning see
        test-time features."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(trainer.precision_plugin.forward_context())
        return stack

    @staticmethod
    def _prepare(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[Tensor], Tensor]:
        """Images on the module's device in the test pass's input dtype."""
        return lambda images: trainer.precision_plugin.convert_input(images.to(pl_module.device))

    @staticmethod
    def _progress(trainer: pl.Trainer, loader: Any, desc: str) -> Any:
        return tqdm(loader, desc=desc, disable=not trainer.is_global_zero or not trainer.progress_bar_callback)

    def _forward_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: Any, desc: str,
                     jigsaw_too: bool = False) -> tuple[ForwardOutputs, Optional[ForwardOutputs]]:
        """Every rank runs the whole (small) dataset, so all ranks tune identically."""
        loader = DataLoader(dataset, batch_size=self._datamodule.batch_size, shuffle=False)
        with self._forward_context(trainer):
            return forward_all(self._progress(trainer, loader, desc), self._prepare(trainer, pl_module),
                               pl_module.forward_outputs, self.jigsaw_seed if jigsaw_too else None)

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

    # -------------------------------------------------------------- test pass
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        bundle = outputs["outputs"].check_finite()  # once per batch, for every detector
        with finite_inputs_checked():
            self._collector.add(dataloader_idx, bundle, outputs["labels"], outputs["indices"],
                                list(pl_module.detectors.values()))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = [detector_name(d) for d in pl_module.detectors.values()]
        per_set = self._collector.gather()
        expected = [len(self._datamodule.test_set)] + [len(d) for d in self._datamodule.ood_test_sets.values()]
        for set_name, data, n in zip(self._loader_names(), per_set, expected):
            if len(data["indices"]) != n:
                raise RuntimeError(f"{set_name}: gathered {len(data['indices'])} distinct samples, dataset has {n}")
        # every rank takes part in this reduction, so all ranks skip the same detectors
        min_feature = float(distributed.all_reduce(self._collector.min_feature, "min"))
        keep = drop_negative_feature_detectors(names, list(pl_module.detectors.values()), min_feature, self.skipped)
        self.results = build_results(
            id_name=self._datamodule.name,
            set_names=self._loader_names(),
            groups=self._datamodule.ood_groups(),
            per_set=per_set,
            detector_names=names,
            kept=keep,
            changes_logits=[d.changes_logits for d in pl_module.detectors.values()],
            skipped=self.skipped,
            detector_info={n: self._describe(d, pl_module) for n, d in zip(names, pl_module.detectors.values())},
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
