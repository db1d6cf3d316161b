"""Open-set quality on the embedded digits benchmark: every objective x every detector.

ID = digits 0-5 of scikit-learn's 8x8 digits (upscaled to 32 px), near-OOD = digits 6-9,
far-OOD = patches of scikit-learn's two sample photographs (lightning_ood.data.digits). For
each loss (ce, isomax_plus, l2_norm) and each seed, a ResNet18 is trained like
configs/quickstart.yaml (width 16, SGD lr 0.05 Nesterov momentum 0.9, wd 5e-4, cosine, batch
32, 15 epochs; ``--epochs`` shortens it on a busy machine — on 2 idle CPU cores the 9
trainings take ~11 minutes) with ``pytorch_lightning.Trainer``, then ``trainer.test`` runs
``OODEvaluation(output_dir=tmp, plots=False)`` with its default detectors (MSP, MaxLogit,
Energy, ASH-P/B/S, WeiPer, FeatureNorm + the loss's native score) and the results are read
from the callback's ``.results``. Reported: near/far AUROC and FPR95 (OOD positive), mean
+- sample std over the seeds, and whether each detector beats MSP on the same model.

Usage::

    python benchmarks/quality_digits.py             # full run (3 seeds), refreshes BENCHMARKS.md
    python benchmarks/quality_digits.py --tiny      # seconds-long smoke run, prints only
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

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from lightning_ood.lightning.module import OODClassifier  # noqa: E402

SECTION = "quality_digits"
LOSSES = ("ce", "isomax_plus", "l2_norm")
#: Report order of the detectors (report names); anything else the callback adds goes last.
ORDER = ("msp", "max_logit", "energy", "ash_p", "ash_b", "ash_s", "weiper", "feature_norm",
         "min_distance", "penultimate_norm")
NATIVE = {"isomax_plus": "min_distance", "l2_norm": "penultimate_norm"}
COLUMNS = ("loss", "detector", "near AUROC %", "near FPR95 %", "far AUROC %", "far FPR95 %",
           "Δ AUROC vs MSP near / far", "beats MSP? near / far")


def train_and_evaluate(loss: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training + evaluation; returns the callback's results and timings."""
    pl.seed_everything(seed, workers=True)
    dm = _common.SmallerDigits(max_test=args.max_test, batch_size=32, num_workers=0,
                               val_size=args.val_size, seed=0)
    model = OODClassifier(loss=loss, num_classes=dm.num_classes, width=args.width, lr=0.05,
                          momentum=0.9, nesterov=True, weight_decay=5e-4, scheduler="cosine")
    with tempfile.TemporaryDirectory() as tmp:
        callback = _common.evaluation_callback(tmp, fit_samples=args.fit_samples, tune=args.tune)
        trainer = pl.Trainer(**_common.trainer_kwargs(
            max_epochs=args.epochs, limit_train_batches=args.limit_train_batches,
            log_every_n_steps=10, callbacks=[callback]))
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, datamodule=dm)
        fit_s, fit_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        with contextlib.redirect_stdout(io.StringIO()):  # the callback prints its full report
            trainer.test(model, datamodule=dm, verbose=False)
        test_s, test_cpu = time.perf_counter() - start - fit_s, time.process_time() - start_cpu - fit_cpu
    results = callback.results
    assert results is not None, "OODEvaluation produced no results"
    print(f"  {loss:<12} seed {seed}: train {fit_s:6.1f} s ({fit_cpu:6.1f} CPU s), evaluate {test_s:6.1f} s "
          f"({test_cpu:6.1f} CPU s), ID acc {100 * results['id']['accuracy']:.1f}%", flush=True)
    return {"results": results, "fit_s": fit_s, "test_s": test_s, "fit_cpu": fit_cpu, "test_cpu": test_cpu}


def _fmt(values: list[float]) -> str:
    mean, std = _common.mean_std([100 * v for v in values])
    return f"{mean:.1f} ± {std:.1f}"


def _verdict(delta: float, noise: float) -> str:
    if abs(delta) <= noise:
        return "tie"
    return "yes" if delta > 0 else "**no**"


def summarise(runs: dict[str, list[dict[str, Any]]]) -> tuple[str, str, str]:
    """(quality table, ID accuracy table, notes) from the runs of every loss."""
    rows, acc_rows, notes, warnings = [], [], [], []
    for loss, loss_runs in runs.items():
        results = [r["results"] for r in loss_runs]
        names = [n for n in ORDER if n in results[0]["metrics"]]
        names += [n for n in results[0]["metrics"] if n not in names]
        auroc = {n: {g: [r["metrics"][n][g]["auroc"] for r in results] for g in ("near", "far")} for n in names}
        fpr = {n: {g: [r["metrics"][n][g]["fpr95"] for r in results] for g in ("near", "far")} for n in names}
        msp = auroc.get("msp")
        for name in names:
            deltas, verdicts = [], []
            for group in ("near", "far"):
                if msp is None or name == "msp":
                    deltas.append("—")
                    verdicts.append("—")
                    continue
                # paired over seeds: the same trained model scored by both detectors
                diffs = [100 * (a - b) for a, b in zip(auroc[name][group], msp[group])]
                mean, std = _common.mean_std(diffs)
                deltas.append(f"{mean:+.1f}")
                verdicts.append(_verdict(mean, std))
            label = f"{name} (native)" if NATIVE.get(loss) == name else name
            rows.append([loss, label, _fmt(auroc[name]["near"]), _fmt(fpr[name]["near"]),
                         _fmt(auroc[name]["far"]), _fmt(fpr[name]["far"]), " / ".join(deltas),
                         " / ".join(verdicts)])
        skipped: dict[str, set[str]] = {}
        for r in results:
            for name, reason in r.get("skipped", {}).items():
                skipped.setdefault(name, set()).add(reason)
        for name, reasons in skipped.items():
            rows.append([loss, name, "skipped", "", "", "", "", "; ".join(sorted(reasons))])
        by_det = results[0]["id"].get("accuracy_by_detector", {})
        shaped = ", ".join(f"{d}-shaped {_fmt([r['id']['accuracy_by_detector'][d] for r in results])}"
                           for d in by_det)
        accuracy_mean = _common.mean_std([r["id"]["accuracy"] for r in results])[0]
        if accuracy_mean < 0.9:
            warnings.append(f"- **{loss}: ID accuracy {100 * accuracy_mean:.1f}%** — under-trained in this "
                            "budget; its OOD rows describe a weak classifier, not the method at convergence")
        med = lambda key: _common.median([r[key] for r in loss_runs])  # noqa: E731
        acc_rows.append([loss, _fmt([r["id"]["accuracy"] for r in results]), shaped or "—",
                         f"{med('fit_s'):.0f} / {med('test_s'):.0f} ({med('fit_cpu'):.0f} / {med('test_cpu'):.0f} CPU)"])
        tuning = [r.get("tuning") or {} for r in results]
        for name in sorted({k for t in tuning for k in t}):
            chosen = [t.get(name, {}).get("parameters", t.get(name, {}).get("mode", "?")) for t in tuning]
            notes.append(f"- {loss} / {name}: hyper-parameters per seed {chosen}")
    quality = _common.markdown_table(COLUMNS, rows)
    accuracy = _common.markdown_table(("loss", "ID accuracy %", "ID accuracy with shaped logits %",
                                       "median train / evaluate s (CPU s)"), acc_rows)
    return quality, "\n".join([accuracy, *([""] + warnings if warnings else [])]), "\n".join(notes)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke run (1 seed, 2 steps, width 4, cut test sets); prints, writes nothing")
    parser.add_argument("--epochs", type=int, default=15,
                        help="training epochs (15 = the quickstart; ~11 min for the 9 trainings on 2 idle cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--width", type=int, default=16, help="ResNet18 width (quickstart: 16)")
    parser.add_argument("--tune", default=None,
                        help="OODEvaluation tune mode (jigsaw / defaults / ...); default: the callback's default")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: robust on a shared machine, where OpenMP threads spin-wait)")
    parser.add_argument("--output", type=Path, default=_common.BENCHMARKS_MD)
    args = parser.parse_args(argv)
    args.limit_train_batches, args.max_test, args.val_size, args.fit_samples = None, None, 100, None
    if args.tiny:
        args.epochs, args.seeds, args.width = 1, [0], 4
        args.limit_train_batches, args.max_test, args.val_size, args.fit_samples = 2, 48, 32, 64
        args.tune = args.tune or "defaults"  # published hyper-parameters: no tuning grid in a smoke run
    if args.threads:
        torch.set_num_threads(args.threads)
    _common.quiet()

    start = time.perf_counter()
    runs = {loss: [train_and_evaluate(loss, seed, args) for seed in args.seeds] for loss in args.losses}
    runtime = time.perf_counter() - start
    quality, accuracy, notes = summarise(runs)
    print()
    print(quality)
    print()
    print(accuracy)
    print(f"\ntotal runtime {runtime:.0f} s")
    if args.tiny:
        return
    cpu = sum(r["fit_cpu"] + r["test_cpu"] for loss_runs in runs.values() for r in loss_runs)
    tune = runs[args.losses[0]][0]["results"].get("tuning")
    tune_mode = args.tune or _common.tune_default()
    body = "\n".join([
        "## Open-set quality on the embedded digits benchmark (CPU)",
        "",
        *_common.header_lines(runtime),
        f"- CPU time of the {sum(len(v) for v in runs.values())} trainings + evaluations: {cpu:,.0f} s "
        f"(wall {runtime:,.0f} s; the difference is time spent waiting for a core while other jobs ran)",
        f"- ID digits 0-5 (n = {runs[args.losses[0]][0]['results']['id']['n']} test images), near-OOD digits "
        "6-9, far-OOD photo patches; fixed data split (seed 0); seeds "
        f"{', '.join(map(str, args.seeds))} vary initialisation and batch order",
        f"- training as configs/quickstart.yaml: ResNet18 width {args.width}, batch 32, SGD lr 0.05 Nesterov 0.9, "
        f"wd 5e-4, cosine; `pytorch_lightning.Trainer`, fp32, CPU — **{args.epochs} epochs**"
        + (" instead of the quickstart's 15 (shortened for time)" if args.epochs != 15 else " (as the quickstart)"),
        "- evaluation: `OODEvaluation(output_dir=tmp, plots=False, fit_samples=None)` defaults "
        f"(detector hyper-parameters: tune = `{tune_mode}`), metrics from its `.results`",
        "- AUROC and FPR@95%TPR in %, **OOD = positive class**; mean ± sample std over the seeds; "
        "'Δ AUROC vs MSP' is the paired difference to MSP on the same trained model (mean over "
        "seeds); 'beats MSP?' is yes/**no** when |Δ| exceeds the std of the paired differences, "
        "else tie. Compare rows across losses with the CE / msp row (the standard baseline).",
        "",
        quality,
        "",
        accuracy,
        *(["", "Detector hyper-parameters chosen (tuning on held-out ID validation data):", notes] if notes and tune else []),
    ])
    _common.write_section(SECTION, body, args.output)


if __name__ == "__main__":
    main()
