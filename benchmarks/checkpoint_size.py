"""Size and save/load time of a model file with WeiPer, compact (format 2) vs full.

An ImageNet ResNet50 (1,000 classes) with the WeiPer ImageNet preset (r = 100) carries a
perturbed head W~ of 100,000 x 2,048 float32 values (819 MB), eight times the network. The
compact file leaves W~ out and ``lightning_ood.load`` re-draws it from the saved head and
seed (checked against its SHA-256); ``compact=False`` stores it. Both files must give the
same W~ bit for bit. WeiPer is fitted on random features (the statistics are tiny either way).

    python benchmarks/checkpoint_size.py           # measures and refreshes BENCHMARKS.md
    python benchmarks/checkpoint_size.py --tiny    # seconds-long smoke run, prints only
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from _common import header_lines, markdown_table, write_section
from lightning_ood.detectors import MSP, FitData, WeiPer
from lightning_ood.deploy import load, save_with_detectors
from lightning_ood.lightning.module import OODClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run; prints, writes nothing")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    if args.tiny:
        model, weiper = OODClassifier("resnet18", num_classes=10, width=8), WeiPer(n_repeats=7)
    else:
        model, weiper = OODClassifier("resnet50", num_classes=1000), WeiPer.from_preset("imagenet")
    model.eval()
    weiper.attach(model.head)
    weiper.fit(FitData(features=torch.relu(torch.randn(256, model.backbone.num_features))))
    model.detectors.update({"msp": MSP(), "weiper": weiper})
    perturbed_mb = weiper.perturbed_weight.numel() * 4 / 1e6

    rows, loaded_weights = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for compact in (True, False):
            path = os.path.join(folder, f"compact_{compact}.ckpt")
            t0 = time.perf_counter()
            save_with_detectors(model, path, compact=compact)
            saved = time.perf_counter() - t0
            t0 = time.perf_counter()
            loaded = load(path)
            loaded_s = time.perf_counter() - t0
            loaded_weights[compact] = loaded.detectors["weiper"].perturbed_weight
            label = "compact (default)" if compact else "compact=False"
            rows.append([label, f"{os.path.getsize(path) / 1e6:,.1f}", f"{saved:.1f}", f"{loaded_s:.1f}"])
            del loaded
    identical = all(torch.equal(w, weiper.perturbed_weight) for w in loaded_weights.values())
    if not identical:
        raise SystemExit("the loaded W~ differs from the saved model's: a bug, please report it")
    table = markdown_table(["file", "size (MB)", "save (s)", "load (s)"], rows)
    shape = tuple(weiper.perturbed_weight.shape)
    print(f"W~ {shape} = {perturbed_mb:,.1f} MB; loaded W~ identical to the saved model's in both files: {identical}")
    print(table)
    if not args.tiny:
        extra = (f"- model: {model.hparams.backbone}, {model.num_classes} classes, WeiPer ImageNet preset; "
                 f"W~ {shape[0]:,} x {shape[1]:,} = {perturbed_mb:,.0f} MB; the W~ loaded from either file "
                 "is bit-identical to the saved one")
        body = "\n".join(["## Model file size with WeiPer: compact vs full", "",
                          *header_lines(time.perf_counter() - start, extra), "", table])
        write_section("checkpoint_size", body)


if __name__ == "__main__":
    main()
