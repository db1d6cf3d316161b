"""Distributed evaluation on CPU: 1 process vs 2 processes (``ddp_spawn``, Gloo).

A ResNet18 (width 16) is trained briefly on the embedded digits benchmark in this process;
the same weights are then evaluated by ``trainer.test`` with ``OODEvaluation`` and all its
default detectors, once on 1 process and once on 2 processes (``strategy="ddp_spawn"``).
With 2 processes each rank fits the detectors on its shard of the ID training images
(statistics reduced across ranks), scores its shard of every test set (Lightning's sampler
pads each rank to equal length), and the callback gathers and de-duplicates the scores
before computing metrics. The metrics must be identical: the largest absolute difference
over every detector x OOD set x metric (and ID accuracies, thresholds) is printed. Also the
wall-time ratio, both for the whole ``trainer.test`` call (process start-up included) and
for the test phase measured inside rank 0 (``on_test_start`` -> ``on_test_end``).

Usage::

    python benchmarks/ddp_scaling.py                 # refreshes BENCHMARKS.md
    python benchmarks/ddp_scaling.py --tiny          # seconds-long smoke run, prints only
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
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

COLUMNS = ("processes", "launch", "torch threads / process", "trainer.test() wall s (incl. start-up)",
           "test phase s (rank 0)", "ratio vs 1 process (wall / phase)", "max abs metric diff vs 1 process",
           "ID n / OOD n (after de-duplication)")


class PhaseFile(pl.Callback):
    """Writes rank 0's test-phase duration to a file (spawned ranks return nothing else)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_test_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"test_s": time.perf_counter() - self.start,
                                                   "threads": torch.get_num_threads(),
                                                   "world_size": trainer.world_size}))


def flatten(results: dict[str, Any]) -> dict[str, float]:
    """Every number that must agree between 1 and N processes."""
    flat: dict[str, float] = {"id/accuracy": results["id"]["accuracy"], "id/n": results["id"]["n"]}
    for det, acc in results["id"].get("accuracy_by_detector", {}).items():
        flat[f"id/accuracy/{det}"] = acc
    for det, sets in results["metrics"].items():
        for set_name, metrics in sets.items():
            for metric, value in metrics.items():
                flat[f"{det}/{set_name}/{metric}"] = value
    for det, value in results.get("thresholds", {}).items():
        flat[f"threshold/{det}"] = value
    for set_name, info in results["ood"].items():
        flat[f"ood/{set_name}/n"] = info["n"]
    return flat


def evaluate(model: OODClassifier, dm: Any, processes: int, args: argparse.Namespace,
             spawn: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        phase_path = os.path.join(tmp, "phase.json")
        callbacks = [PhaseFile(phase_path),
                     _common.evaluation_callback(tmp, fit_samples=args.fit_samples, tune=args.tune)]
        extra = dict(devices=processes, strategy="ddp_spawn") if spawn else dict(devices=1)
        trainer = pl.Trainer(**_common.trainer_kwargs(callbacks=callbacks, **extra))
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.test(model, datamodule=dm, verbose=False)
        wall = time.perf_counter() - start
        results = json.loads(Path(tmp, "results.json").read_text())
        phase = json.loads(Path(phase_path).read_text())
    launch = "ddp_spawn" if spawn else "in-process"
    print(f"  {processes} process(es), {launch}: trainer.test {wall:.1f} s, test phase {phase['test_s']:.1f} s "
          f"({phase['threads']} threads / process)", flush=True)
    return {"processes": processes, "launch": launch, "wall": wall, "phase": phase["test_s"],
            "threads": phase["threads"], "results": results}


def train(args: argparse.Namespace) -> tuple[OODClassifier, Any]:
    pl.seed_everything(0, workers=True)
    dm = _common.SmallerDigits(max_test=args.max_test, batch_size=32, num_workers=0, val_size=args.val_size)
    model = OODClassifier(loss=args.loss, num_classes=dm.num_classes, width=args.width, lr=0.05, momentum=0.9,
                          nesterov=True, weight_decay=5e-4, scheduler="cosine")
    trainer = pl.Trainer(**_common.trainer_kwargs(max_epochs=args.epochs, limit_train_batches=args.limit_train_batches,
                                                  limit_val_batches=0, num_sanity_val_steps=0))
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    print(f"  trained {args.loss} width {args.width} for {args.epochs} epoch(s) in {time.perf_counter() - start:.0f} s",
          flush=True)
    # a fresh datamodule for evaluation: what a user passes to trainer.test
    dm = _common.SmallerDigits(max_test=args.max_test, batch_size=32, num_workers=0, val_size=args.val_size)
    return model.cpu(), dm


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run; prints, writes nothing")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the evaluated model")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--loss", default="ce", choices=("ce", "isomax_plus", "l2_norm"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process, in this interpreter and in every spawned rank "
                             "(0: torch's default here, Lightning's cores // processes in the ranks)")
    parser.add_argument("--tune", default=None,
                        help="OODEvaluation tune mode (jigsaw / defaults / ...); default: the callback's default")
    parser.add_argument("--output", type=Path, default=_common.BENCHMARKS_MD)
    args = parser.parse_args(argv)
    args.max_test, args.val_size, args.fit_samples, args.limit_train_batches = None, 100, None, None
    if args.tiny:
        args.epochs, args.width, args.max_test, args.val_size, args.fit_samples = 1, 4, 41, 24, 63
        args.limit_train_batches = 2
        args.tune = args.tune or "defaults"  # published hyper-parameters: no tuning grid in a smoke run
    if args.threads:
        torch.set_num_threads(args.threads)
        # spawned ranks read it at start-up (else Lightning gives each cores // processes threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    _common.quiet()
    start = time.perf_counter()
    model, dm = train(args)
    runs = [evaluate(model, dm, 1, args, spawn=False)]
    if not args.tiny:  # the cold 1-process baseline; the smoke run spares itself a third interpreter
        runs.append(evaluate(model, dm, 1, args))
    runs.append(evaluate(model, dm, 2, args))
    reference = flatten(runs[0]["results"])
    rows = []
    for run in runs:
        flat = flatten(run["results"])
        missing = set(reference) ^ set(flat)
        diff = max(abs(flat[k] - reference[k]) for k in reference if k in flat)
        run["diff"], run["missing"] = diff, missing
        res = run["results"]
        ood_n = " + ".join(str(v["n"]) for v in res["ood"].values())
        spawned = [r for r in runs if r["launch"] == "ddp_spawn"]
        base = spawned[0] if run["launch"] == "ddp_spawn" and len(spawned) > 1 else runs[0]  # like with like
        rows.append([run["processes"], run["launch"], run["threads"], f"{run['wall']:.1f}", f"{run['phase']:.1f}",
                     f"{run['wall'] / base['wall']:.2f} / {run['phase'] / base['phase']:.2f}",
                     f"{diff:.2e}" + (f" (keys differ: {sorted(missing)[:3]})" if missing else ""),
                     f"{res['id']['n']} / {ood_n}"])
    table = _common.markdown_table(COLUMNS, rows)
    runtime = time.perf_counter() - start
    print("\n" + table)
    print(f"\nmax abs difference over {len(reference)} numbers (metrics, accuracies, thresholds, counts): "
          f"{max(r['diff'] for r in runs):.3e}")
    print(f"total runtime {runtime:.0f} s")
    if any(r["missing"] for r in runs):
        raise SystemExit(f"1- and 2-process results report different keys: {[sorted(r['missing']) for r in runs]}")
    if args.tiny:
        return
    detectors = ", ".join(runs[0]["results"]["metrics"])
    body = "\n".join([
        "## Distributed evaluation on CPU: 1 vs 2 processes (ddp_spawn)",
        "",
        *_common.header_lines(runtime),
        f"- model: ResNet18 width {args.width}, {args.loss}, trained {args.epochs} epochs on the digits benchmark "
        "(this script); evaluated by `trainer.test` + `OODEvaluation` (all ID training images for fitting, "
        f"tune = `{args.tune or _common.tune_default()}`), detectors: {detectors}",
        "- 2 processes: `Trainer(accelerator='cpu', devices=2, strategy='ddp_spawn')` (Gloo); results read "
        "from rank 0's results.json; the sample counts show the padded duplicates were dropped",
        f"- max abs difference over {len(reference)} numbers (every detector x OOD set x metric, ID "
        f"accuracies, thresholds, counts): **{max(r['diff'] for r in runs):.3e}**",
        "- rows: 1 process in this interpreter (warm), 1 process started by ddp_spawn (cold, like the 2 "
        "ranks), 2 processes by ddp_spawn; ratios of spawned runs are against the spawned 1-process run, "
        "'test phase' = rank 0's `on_test_start` -> `on_test_end` (fitting, tuning, test batches, gathering, "
        "metrics). Every rank runs the (small) tuning pass in full so all ranks choose the same "
        "hyper-parameters; the fitting pass and the test sets are sharded",
        "- on a 2-core machine the ranks share the two cores with each other (and with other jobs), so "
        "little speed-up is possible here; the ratio shows the cost of start-up, Gloo collectives and "
        "de-duplication rather than scaling",
        "",
        table,
    ])
    _common.write_section("ddp_scaling", body, args.output)


if __name__ == "__main__":
    main()
