"""Cost of the default tuning grids (issue 7) at CIFAR scale, on cached features.

ASH (13 percentiles, three variants) and WeiPer (72 grid points + the preset, one refit per
delta) scored on held-out ID validation features vs pseudo-OOD features, with the
CIFAR-10 ResNet18 shapes: D = 512, C = 10, 1,000 validation + 1,000 jigsaw images, WeiPer
refitted on 5,000 training features. The forward passes that produce the cached features
are not included (one pass over the validation and jigsaw images).

    python benchmarks/tuning_cost.py           # measures and refreshes BENCHMARKS.md
    python benchmarks/tuning_cost.py --tiny    # seconds-long smoke run, prints only
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from _common import header_lines, markdown_table, write_section
from lightning_ood.detectors import ASH, WeiPer
from lightning_ood.detectors.base import FitData, ForwardOutputs
from lightning_ood.evaluation.tuning import TuningData, tune_detectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run; prints, writes nothing")
    args = parser.parse_args()
    dim, classes = (64, 10) if args.tiny else (512, 10)
    n_val, n_fit = (100, 200) if args.tiny else (1000, 5000)
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(dim, classes)
    features = lambda n, shift: torch.relu(torch.randn(n, dim, generator=generator) + shift)  # noqa: E731
    with torch.no_grad():
        id_features, ood_features, train = features(n_val, 0.5), features(n_val, 0.0), features(n_fit, 0.5)
        data = TuningData(ForwardOutputs(head(id_features), id_features),
                          ForwardOutputs(head(ood_features), ood_features), "jigsaw", "synthetic")
    # the tiny run tries two WeiPer grid points (plus the preset) instead of 72
    weiper_grid = {"delta": [1.8], "lambda1": [0.1, 2.5], "lambda2": [0.1], "smoothing": [4],
                   "smoothing_perturbed": [15]} if args.tiny else None
    rows = []
    start = time.perf_counter()
    for name, detectors in (("ASH-P/B/S", [ASH(v, 95.0) for v in "pbs"]), ("WeiPer", [WeiPer.from_preset("cifar10")])):
        for d in detectors:
            d.attach(head)
            d.fit(FitData(features=train))
        t0 = time.perf_counter()
        report = tune_detectors(detectors, data, FitData(features=train), {"weiper": weiper_grid})
        seconds = time.perf_counter() - t0
        grid_points = sum(len(entry["grid"]) for entry in report.values())
        rows.append([name, grid_points, f"{seconds:.2f}"])
    table = markdown_table(["detectors", "grid points scored", "seconds"], rows)
    print(table)
    if not args.tiny:
        body = "\n".join(["## Tuning cost (issue 7)", "", *header_lines(time.perf_counter() - start,
                          f"- shapes: D={dim}, C={classes}, {n_val} validation + {n_val} pseudo-OOD samples, "
                          f"WeiPer refitted on {n_fit} training features per delta"), "", table])
        write_section("tuning_cost", body)


if __name__ == "__main__":
    main()
