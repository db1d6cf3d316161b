"""Evaluation speed: a test pass with every detector attached vs a plain test pass.

1. ``trainer.test`` over the same data (ID test set + OOD sets) twice, alternating R times:
   plain (the model's ``test_step`` only) and with ``OODEvaluation`` and all its default
   detectors (MSP, MaxLogit, Energy, ASH-P/B/S, WeiPer, FeatureNorm). A timing callback placed
   before ``OODEvaluation`` splits the evaluated run into the fitting pass (``on_test_start``:
   detector fitting on ID training images, jigsaw pass, tuning) and the test pass proper
   (``on_test_epoch_start`` -> ``on_test_end``: batches, scoring, gathering, metrics, report
   files), which is compared with the plain pass.
2. Per-detector scoring cost on cached forward outputs (what each detector adds per image).
3. WeiPer and FeatureNorm fit / score throughput on random features (WeiPer through
   ``benchmarks/weiper_throughput.py``'s helpers) and the peak memory of fitting at two
   training-set sizes, with the size of the fitted detector state (must not grow with N).

Usage::

    python benchmarks/eval_speed.py                  # CPU, refreshes BENCHMARKS.md
    python benchmarks/eval_speed.py --tiny           # seconds-long smoke run, prints only
    python benchmarks/eval_speed.py --gpu            # evaluation throughput on a GPU (synthetic
                                                     # CIFAR-size data, ResNet18 width 64)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import weiper_throughput as wt  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from lightning_ood.data.base import IndexedDataset, OODDataModule, OODSet  # noqa: E402
from lightning_ood.detectors import FeatureNorm, FitData  # noqa: E402
from lightning_ood.lightning.module import OODClassifier  # noqa: E402

TARGET = 1.3
PASS_COLUMNS = ("model", "images", "plain test pass s", "test pass with every detector s", "ratio",
                "target", "meets target?", "fitting pass s (separate)")
DETECTOR_COLUMNS = ("detector", "score ms / 1000 images", "share of the plain forward pass")
THROUGHPUT_COLUMNS = ("detector", "fit samples/s (N)", "score samples/s (B)",
                      "fit peak MB (N small / large)", "fitted state bytes (N small / large)")


# ----------------------------------------------------------------------------- data
class SyntheticDataModule(OODDataModule):
    """Random CIFAR-size images (for throughput only): ID train/val/test + two OOD sets."""

    name = "synthetic"
    num_classes = 10
    image_size = 32

    def __init__(self, n_train: int = 5000, n_test: int = 2000, batch_size: int = 128, num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, val_size=200,
                         ood_sets=[OODSet("noise_a", "near"), OODSet("noise_b", "far")])
        self.n_train, self.n_test = n_train, n_test

    def _tensors(self, n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))

    def test_transform(self):
        return T.Normalize(self.mean, self.std)

    def build(self) -> dict[str, Any]:
        train, val, test = self._tensors(self.n_train, 0), self._tensors(self.val_size, 1), self._tensors(self.n_test, 2)
        tf = self.test_transform()
        return {"train": IndexedDataset(train, tf), "fit": IndexedDataset(train, tf), "val": IndexedDataset(val, tf),
                "test": IndexedDataset(test, tf), "train_labels": train.tensors[1]}

    def build_ood(self, spec: OODSet) -> IndexedDataset:
        return IndexedDataset(self._tensors(self.n_test, 3 if spec.name == "noise_a" else 4),
                              self.test_transform(), ood=True)


# ----------------------------------------------------------------------------- part 1
class PhaseTimer(pl.Callback):
    """Wall-clock marks of the test phases (put it before OODEvaluation in the list)."""

    def _mark(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_test_start(self, trainer, pl_module) -> None:
        self.start = self._mark(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_start = self._mark(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self.end = self._mark(pl_module)

    @property
    def fitting_s(self) -> float:
        return self.epoch_start - self.start

    @property
    def test_s(self) -> float:
        return self.end - self.epoch_start


def timed_test(model: OODClassifier, dm: OODDataModule, accelerator: str, with_detectors: bool,
               fit_samples: Optional[int], tune: Optional[str] = None) -> tuple[PhaseTimer, Optional[Any]]:
    timer = PhaseTimer()
    with tempfile.TemporaryDirectory() as tmp:
        callbacks: list[pl.Callback] = [timer]
        evaluation = None
        if with_detectors:
            evaluation = _common.evaluation_callback(tmp, fit_samples=fit_samples, tune=tune)
            callbacks.append(evaluation)
        trainer = pl.Trainer(**_common.trainer_kwargs(accelerator=accelerator, callbacks=callbacks))
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.test(model, datamodule=dm, verbose=False)
    return timer, evaluation


def pass_ratio(args: argparse.Namespace, width: int, synthetic: bool) -> dict[str, Any]:
    accelerator = "gpu" if args.gpu and torch.cuda.is_available() else "cpu"
    if synthetic:
        dm: OODDataModule = SyntheticDataModule(args.n_train, args.n_test, batch_size=args.batch)
    else:
        dm = _common.SmallerDigits(max_test=args.max_test, batch_size=args.batch, num_workers=0,
                                   val_size=args.val_size)
    dm.setup("test")
    torch.manual_seed(0)
    model = OODClassifier(num_classes=dm.num_classes, width=width)
    images = len(dm.test_set) + sum(len(d) for d in dm.ood_test_sets.values())
    # warm-up: one plain pass (allocator, oneDNN / cuDNN kernel selection)
    timed_test(model, dm, accelerator, False, args.fit_samples, args.tune)
    plain, full, fitting = [], [], []
    evaluation = None
    for r in range(args.repeats):
        for with_detectors in ((False, True) if r % 2 == 0 else (True, False)):
            timer, ev = timed_test(model, dm, accelerator, with_detectors, args.fit_samples, args.tune)
            (full if with_detectors else plain).append(timer.test_s)
            if with_detectors:
                fitting.append(timer.fitting_s)
                evaluation = ev
    per_detector = detector_costs(model, dm, accelerator)
    ratio = _common.median(full) / _common.median(plain)
    detectors = list((evaluation.results or {}).get("metrics", {})) if evaluation else []
    data = "synthetic" if synthetic else "digits"
    return {"model": f"ResNet18 width {width} ({data})", "images": images, "plain": _common.median(plain),
            "full": _common.median(full), "ratio": ratio, "fitting": _common.median(fitting),
            "per_detector": per_detector, "detectors": detectors,
            "tuning": (evaluation.results or {}).get("tuning") if evaluation else None,
            "fit_images": (evaluation.results or {}).get("detectors", {}).get("feature_norm", {}).get("num_fit_images")
            if evaluation else None}


@torch.no_grad()
def detector_costs(model: OODClassifier, dm: OODDataModule, accelerator: str) -> dict[str, Any]:
    """Scoring time of each fitted detector on the cached forward outputs of the ID test set,
    and the plain forward time of the same images."""
    from lightning_ood.detectors.base import ForwardOutputs

    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    model = model.to(device).eval()
    loader = torch.utils.data.DataLoader(dm.test_set, batch_size=dm.batch_size)
    outputs, forward_s = [], 0.0
    for images, _, _ in loader:
        images = images.to(device)
        start = time.perf_counter()
        model.forward_outputs(images)
        forward_s += time.perf_counter() - start
        outputs.append(model.forward_outputs(images, with_block_norms=True))
    n = sum(len(o.logits) for o in outputs)
    costs = {"forward_ms_per_1000": 1000 * forward_s / n * 1000}
    for name, detector in model.detectors.items():
        def score_all() -> None:
            for o in outputs:
                detector(ForwardOutputs(o.logits, o.features, o.block_norms))
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        costs[name] = 1000 * best_seconds(score_all, 3) / n * 1000  # warm-up call, then best of 3
    return costs


# ----------------------------------------------------------------------------- part 3
def best_seconds(fn, repeats: int) -> float:
    """Fastest wall-clock seconds of ``repeats`` calls (weiper_throughput's helper)."""
    value = wt.best_seconds(fn, repeats)
    return float(value[0] if isinstance(value, tuple) else value)


def peak_mb(fn) -> Optional[float]:
    """Peak memory (MB) that ``fn`` allocates: weiper_throughput's measure (peak of live torch
    tensors, replayed from the profiler's allocation events, when it offers it; else the
    resident-set high-water mark)."""
    measure = getattr(wt, "peak_tensor_mb", None) or getattr(wt, "peak_extra_mb", None)
    return None if measure is None else measure(fn)


def peak_method() -> str:
    if hasattr(wt, "peak_tensor_mb"):
        return "peak of live torch tensors during the call (profiler allocation events, `weiper_throughput.peak_tensor_mb`)"
    return "resident-memory high-water mark above the memory in use before the call (`/proc/self/clear_refs`)"


def state_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers() if b is not None)


def weiper_row(sizes: dict[str, int]) -> list[Any]:
    det = wt.make_detector("cifar10", 10, 512)
    train = wt.random_features(sizes["fit"], 512, seed=1)
    test = wt.random_features(sizes["score"], 512, seed=2) * 1.2
    fit_s = best_seconds(lambda: det.fit_features(train), 2)
    score_s = best_seconds(lambda: det.score_features(test), 2)
    mem, state = [], []
    for n in (sizes["small"], sizes["large"]):
        det_n = wt.make_detector("cifar10", 10, 512)
        mem.append(peak_mb(lambda: det_n.fit_features(wt.StreamedFeatures(n, 512, 256, seed=3))))
        state.append(state_bytes(det_n))
    return ["WeiPer (cifar10 preset, C=10, D=512, r=100)", f"{len(train) / fit_s:,.0f} ({len(train):,})",
            f"{len(test) / score_s:,.0f} ({len(test):,})", _mb_pair(mem, sizes), _bytes_pair(state)]


def featurenorm_row(sizes: dict[str, int], blocks: int = 8) -> list[Any]:
    def data(n: int, seed: int) -> FitData:
        g = torch.Generator().manual_seed(seed)
        return FitData(features=torch.zeros(n, 0), block_norms=torch.rand(n, blocks, generator=g) + 0.5,
                       jigsaw_block_norms=torch.rand(n, blocks, generator=g) + 0.5)

    from lightning_ood.detectors.base import ForwardOutputs

    det = FeatureNorm(blocks)
    fit_data = data(sizes["fit"], 1)
    fit_s = best_seconds(lambda: det.fit(fit_data), 3)
    test = ForwardOutputs(torch.zeros(sizes["score"], 10), torch.zeros(sizes["score"], 0),
                          torch.rand(sizes["score"], blocks))
    score_s = best_seconds(lambda: det(test), 3)
    mem, state = [], []
    for n in (sizes["small"], sizes["large"]):
        det_n, d = FeatureNorm(blocks), data(n, 2)
        mem.append(peak_mb(lambda: det_n.fit(d)))
        state.append(state_bytes(det_n))
    return [f"FeatureNorm ({blocks} blocks; fit = NormRatio from cached block norms)",
            f"{len(fit_data.block_norms) / fit_s:,.0f} ({sizes['fit']:,})",
            f"{sizes['score'] / score_s:,.0f} ({sizes['score']:,})", _mb_pair(mem, sizes), _bytes_pair(state)]


def _mb_pair(mem: list[Optional[float]], sizes: dict[str, int]) -> str:
    return (" / ".join("n/a" if m is None else f"{m:,.1f}" for m in mem)
            + f" (N = {sizes['small']:,} / {sizes['large']:,})")


def _bytes_pair(state: list[int]) -> str:
    return f"{state[0]:,} / {state[1]:,}" + (" (same)" if state[0] == state[1] else " (**grows**)")


# ----------------------------------------------------------------------------- tables
def pass_table(rows: list[dict[str, Any]]) -> str:
    return _common.markdown_table(PASS_COLUMNS, [
        [r["model"], f"{r['images']:,}", f"{r['plain']:.2f}", f"{r['full']:.2f}", f"{r['ratio']:.2f}",
         f"≤ {TARGET}", "yes" if r["ratio"] <= TARGET else "**no**", f"{r['fitting']:.2f}"] for r in rows])


def detector_table(row: dict[str, Any]) -> str:
    costs = dict(row["per_detector"])
    forward = costs.pop("forward_ms_per_1000")
    lines = [["(plain forward pass, for scale)", f"{forward:,.1f}", "100%"]]
    lines += [[name, f"{ms:,.2f}", f"{100 * ms / forward:.1f}%"] for name, ms in costs.items()]
    return _common.markdown_table(DETECTOR_COLUMNS, lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run; prints, writes nothing")
    parser.add_argument("--widths", type=int, nargs="+", default=[16],
                        help="ResNet18 widths (16 = quickstart; the smaller the backbone, the larger "
                             "the detectors' relative cost)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating plain / evaluated passes each")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: robust on a shared machine, where OpenMP threads spin-wait)")
    parser.add_argument("--gpu", action="store_true",
                        help="evaluation throughput on a GPU: synthetic CIFAR-size data, width 64, batch 256")
    parser.add_argument("--tune", default=None,
                        help="OODEvaluation tune mode (jigsaw / defaults / ...); default: the callback's default")
    parser.add_argument("--output", type=Path, default=_common.BENCHMARKS_MD)
    args = parser.parse_args(argv)
    args.max_test, args.val_size, args.fit_samples = None, 100, None
    sizes = dict(fit=20_000, score=10_000, small=10_000, large=100_000)
    if args.gpu:
        args.widths, args.batch, args.n_train, args.n_test = [64], 256, 50_000, 10_000
        args.fit_samples = 5000
        if not torch.cuda.is_available():
            print("no CUDA device: running the --gpu measurement on the CPU (only useful as a smoke test)")
    if args.tiny:
        args.widths, args.repeats, args.max_test, args.val_size, args.fit_samples = [4], 1, 48, 32, 64
        args.n_train, args.n_test, args.batch = 256, 128, 32
        args.tune = args.tune or "defaults"  # published hyper-parameters: no tuning grid in a smoke run
        sizes = dict(fit=500, score=200, small=100, large=400)
    if args.threads:
        torch.set_num_threads(args.threads)
    _common.quiet()
    start = time.perf_counter()
    rows = [pass_ratio(args, width, synthetic=args.gpu) for width in args.widths]
    if args.tiny and not args.gpu:  # smoke-test the --gpu code path (synthetic data) too
        rows.append(pass_ratio(args, args.widths[0], synthetic=True))
    throughput = [weiper_row(sizes), featurenorm_row(sizes)] if not args.gpu else []
    runtime = time.perf_counter() - start
    tables = [pass_table(rows), detector_table(rows[-1])]
    if throughput:
        tables.append(_common.markdown_table(THROUGHPUT_COLUMNS, throughput))
    print("\n" + "\n\n".join(tables))
    print(f"\ntotal runtime {runtime:.0f} s")
    if args.tiny:
        return
    last = rows[-1]
    fit_images = last["fit_images"]
    if args.gpu:
        title = "## Evaluation throughput on a GPU"
        data = (f"synthetic CIFAR-size data ({last['images']:,} test images: ID + 2 OOD sets), "
                f"batch {args.batch}, detectors fitted on {args.fit_samples:,} training images")
        section = "eval_speed_gpu"
        extra = [f"- evaluation throughput with every detector: {last['images'] / last['full']:,.0f} images/s "
                 f"(plain: {last['images'] / last['plain']:,.0f} images/s)"]
    else:
        title = "## Evaluation speed (CPU): every detector vs a plain test pass"
        data = (f"embedded digits benchmark ({last['images']:,} test images: ID test + near + far), batch "
                f"{args.batch}, untrained seeded ResNet18 (scoring cost does not depend on the weights); "
                f"detectors fitted on all {fit_images or 'the'} ID training images")
        section = "eval_speed"
        extra = []
    tuning = last.get("tuning") or {}
    body = "\n".join([
        title, "",
        *_common.header_lines(runtime),
        f"- {data}",
        f"- {args.repeats} alternating repeats of each pass after one warm-up pass; medians. Test pass = "
        "`on_test_epoch_start` -> `on_test_end` (forward, every detector's score, gathering, metrics, "
        "results.json/csv; no plots); fitting pass = `on_test_start` of `OODEvaluation` (ID training "
        "features + jigsaw pass, detector fits"
        + (f", tuning on ID validation + jigsaw: {', '.join(sorted(tuning))}" if tuning else "") + ")",
        f"- detectors: {', '.join(last['detectors'])}",
        *extra,
        "",
        tables[0],
        "",
        "Scoring cost of each fitted detector on cached forward outputs (ID test set; the "
        "feature_norm row reads block norms that the forward pass computes when it is attached):",
        "",
        tables[1],
        *(["",
           "Detector fit / score throughput on random features (best of repeated runs), peak memory "
           f"of fitting ({peak_method()}; WeiPer fits from batches streamed by a generator, so the "
           "data set itself is never in memory) and the size of the fitted state (all buffers). "
           "Note: `OODEvaluation`'s fitting pass itself caches the pooled features and block norms "
           "of the fit images, N x (D + 2 x blocks) floats (5,000 CIFAR images at D = 512: ~10 MB); "
           "`fit_samples` bounds N.",
           "",
           tables[2]] if throughput else []),
    ])
    _common.write_section(section, body, args.output)


if __name__ == "__main__":
    main()
