"""Training speed: the OOD objectives against softmax CE, Lightning against a plain loop,
and (on a GPU) the standard DataLoader against the on-device fast path.

1. Objectives: one training step (``OODClassifier.training_step`` + backward + SGD step) of
   ``isomax_plus`` and ``l2_norm`` relative to ``ce``: the same ResNet18 backbone (same
   initial weights), batch and data. The three are measured side by side in one process,
   interleaved step by step (the order rotates every round), after warm-up rounds; reported
   are the median step times, their ratios and the median / quartiles of the per-round ratios.
   Also the isolated cost of head + loss (forward + backward on pooled features), which is
   all that differs between the objectives.
2. Lightning overhead: the same model and DataLoader in a plain PyTorch loop (forward,
   cross-entropy, backward, step) vs ``Trainer.fit`` (the module's ``training_step``, which also
   updates its accuracy metric and calls ``self.log``); blocks of steps alternate between the
   two; per-step time = time between consecutive batch starts (data loading included),
   warm-up steps of every block dropped.
3. ``--loaders`` (meant for a GPU): images/s of ResNet18 CIFAR-10 training with the standard
   DataLoader vs ``data.device_loader`` (lightning_ood/data/device_loader.py), the GPU rows of
   BENCHMARKS.md.

Usage::

    python benchmarks/train_speed.py                 # CPU parts 1-2, refreshes BENCHMARKS.md
    python benchmarks/train_speed.py --tiny          # seconds-long smoke run, prints only
    python benchmarks/train_speed.py --loaders --data-root data   # GPU part 3
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ood.lightning.module import OODClassifier  # noqa: E402

LOSSES = ("ce", "isomax_plus", "l2_norm")
TARGETS = {"isomax_plus": 1.05, "l2_norm": 1.02}
LIGHTNING_TARGET = 1.05
OBJECTIVE_COLUMNS = ("objective", "median step ms (wall / CPU)", "ratio vs ce (wall / CPU)",
                     "per-round wall ratio median [q1, q3]", "target", "meets target? (wall / CPU)",
                     "head + loss fwd/bwd ms", "ratio implied by head + loss")
LIGHTNING_COLUMNS = ("loop", "median step ms (wall / CPU)", "ratio vs plain (wall / CPU)", "target",
                     "meets target? (wall / CPU)", "steps timed", "end-to-end s (incl. set-up)")
LOADER_COLUMNS = ("training path", "precision", "channels_last / compile", "images/s", "speed-up")


# ----------------------------------------------------------------------------- helpers
def make_model(loss: str, width: int, num_classes: int = 10) -> OODClassifier:
    torch.manual_seed(0)  # the backbone is built first: identical initial weights for every loss
    return OODClassifier(loss=loss, num_classes=num_classes, width=width, lr=0.1, momentum=0.9,
                         nesterov=True, weight_decay=5e-4, scheduler="none")


def make_batches(count: int, batch: int, size: int, num_classes: int = 10) -> list[tuple]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randint(0, num_classes, (batch,), generator=generator),
             torch.arange(batch) + i * batch) for i in range(count)]


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


# ----------------------------------------------------------------------------- part 1
def objective_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Interleaved step times of the three objectives."""
    models = {loss: make_model(loss, args.width).train() for loss in LOSSES}
    optimizers = {loss: sgd(m) for loss, m in models.items()}
    # every timed step starts from the initial weights: the models do not drift apart (tiny or
    # denormal values make float ops slower on CPUs), so the only difference left is the objective
    initial = {loss: copy.deepcopy(m.state_dict()) for loss, m in models.items()}
    batches = make_batches(4, args.batch, args.size)
    times: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    cpu: dict[str, list[float]] = {loss: [] for loss in LOSSES}

    def step(loss: str, k: int) -> tuple[float, float]:
        model, optimizer = models[loss], optimizers[loss]
        model.load_state_dict(initial[loss])
        optimizer.state.clear()
        start, start_cpu = time.perf_counter(), time.process_time()
        value = model.training_step(batches[k % len(batches)], k)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - start_cpu

    rounds = args.warmup + args.steps
    for r in range(rounds):
        order = LOSSES[r % 3:] + LOSSES[:r % 3]
        for loss in order:
            elapsed, elapsed_cpu = step(loss, r)
            if r >= args.warmup:
                times[loss].append(elapsed)
                cpu[loss].append(elapsed_cpu)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{loss} {1000 * times[loss][-1]:,.0f} ms" for loss in LOSSES if r >= args.warmup), flush=True)
    head_ms = head_and_loss_ms(models, args)
    ce, ce_cpu = _common.median(times["ce"]), _common.median(cpu["ce"])
    ce_cpu_ms = 1000 * ce_cpu
    rows = []
    for loss in LOSSES:
        per_round = [a / b for a, b in zip(times[loss], times["ce"])]
        q1, q2, q3 = quartiles(per_round)
        rows.append({"loss": loss, "median_ms": 1000 * _common.median(times[loss]),
                     "ratio": _common.median(times[loss]) / ce, "round": (q2, q1, q3),
                     "cpu_ms": 1000 * _common.median(cpu[loss]), "cpu_ratio": _common.median(cpu[loss]) / ce_cpu,
                     "target": TARGETS.get(loss), "head_ms": head_ms[loss], "n": len(times[loss]),
                     # the objectives share the backbone: only head + loss differ
                     "implied": 1 + (head_ms[loss] - head_ms["ce"]) / ce_cpu_ms})
    return rows


def head_and_loss_ms(models: dict[str, OODClassifier], args: argparse.Namespace) -> dict[str, float]:
    """Forward + backward of head + loss alone, on pooled features (median of 50)."""
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(args.batch, models["ce"].backbone.num_features, generator=generator).relu()
    labels = torch.randint(0, 10, (args.batch,), generator=generator)
    out = {}
    for loss, model in models.items():
        times = []
        for i in range(60):
            x = features.clone().requires_grad_(True)
            start = time.perf_counter()
            logits = model.head(x)
            if loss == "isomax_plus":
                from lightning_ood.nn.objectives import isomax_plus_loss

                value = isomax_plus_loss(logits, labels, model.hparams["entropic_scale"])
            else:
                value = model.criterion(logits, labels)
            value.backward()
            if i >= 10:
                times.append(time.perf_counter() - start)
        out[loss] = 1000 * _common.median(times)
    return out


# ----------------------------------------------------------------------------- part 2
class StepStarts(pl.Callback):
    """Records ``perf_counter`` at every training batch start (and the last batch end)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.cpu_starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        self.cpu_starts.append(time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end, self.cpu_end = time.perf_counter(), time.process_time()


def intervals(starts: list[float], end: float, skip: int) -> list[float]:
    marks = starts + [end]
    return [b - a for a, b in zip(marks[:-1], marks[1:])][skip:]


def lightning_overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    n = args.batch * args.block_steps
    generator = torch.Generator().manual_seed(3)
    dataset = TensorDataset(torch.randn(n, 3, args.size, args.size, generator=generator),
                            torch.randint(0, 10, (n,), generator=generator), torch.arange(n))
    plain_model = make_model("ce", args.width).train()
    lightning_model = copy.deepcopy(plain_model)
    initial = copy.deepcopy(plain_model.state_dict())
    plain, lit, plain_total, lit_total, plain_cpu, lit_cpu = [], [], [], [], [], []

    def plain_block(seed: int) -> None:
        torch.manual_seed(seed)
        plain_model.load_state_dict(initial)  # both loops start every block from the same weights
        optimizer = sgd(plain_model)
        loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=0)
        starts, cpu_starts, begin = [], [], time.perf_counter()
        for images, labels, _ in loader:
            starts.append(time.perf_counter())
            cpu_starts.append(time.process_time())
            loss = F.cross_entropy(plain_model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        end, cpu_end = time.perf_counter(), time.process_time()
        plain.extend(intervals(starts, end, args.block_warmup))
        plain_cpu.extend(intervals(cpu_starts, cpu_end, args.block_warmup))
        plain_total.append(end - begin)
        print(f"  plain block: median step {1000 * _common.median(plain[-len(starts) + args.block_warmup:]):,.0f} ms",
              flush=True)

    def lightning_block(seed: int) -> None:
        torch.manual_seed(seed)
        lightning_model.load_state_dict(initial)
        loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=0)
        timer = StepStarts()
        trainer = pl.Trainer(**_common.trainer_kwargs(max_epochs=1, callbacks=[timer], log_every_n_steps=10,
                                                      num_sanity_val_steps=0))
        begin = time.perf_counter()
        trainer.fit(lightning_model, train_dataloaders=loader)
        lit_total.append(time.perf_counter() - begin)
        lit.extend(intervals(timer.starts, timer.end, args.block_warmup))
        lit_cpu.extend(intervals(timer.cpu_starts, timer.cpu_end, args.block_warmup))
        print(f"  Trainer.fit block: median step "
              f"{1000 * _common.median(lit[-len(timer.starts) + args.block_warmup:]):,.0f} ms", flush=True)

    for r in range(args.blocks):
        first, second = (plain_block, lightning_block) if r % 2 == 0 else (lightning_block, plain_block)
        first(r)
        second(r)
    base, base_cpu = _common.median(plain), _common.median(plain_cpu)
    return [
        {"loop": "plain PyTorch loop", "median_ms": 1000 * base, "ratio": 1.0, "n": len(plain),
         "cpu_ms": 1000 * base_cpu, "cpu_ratio": 1.0, "total": _common.median(plain_total)},
        {"loop": "Trainer.fit", "median_ms": 1000 * _common.median(lit), "ratio": _common.median(lit) / base,
         "cpu_ms": 1000 * _common.median(lit_cpu), "cpu_ratio": _common.median(lit_cpu) / base_cpu,
         "n": len(lit), "total": _common.median(lit_total)},
    ]


# ----------------------------------------------------------------------------- part 3
class ThroughputTimer(pl.Callback):
    """Images/s over the training batches after ``warmup`` (synchronising CUDA at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.count, self.start, self.end = warmup, 0, None, None

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.count += len(batch[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.end = time.perf_counter()

    @property
    def images_per_s(self) -> float:
        return self.count / (self.end - self.start) if self.start and self.end and self.count else float("nan")


def _synthetic_cifar(n: int, seed: int):
    """A CIFAR-10-shaped stand-in (uint8 HWC ``data``, ``targets``, PIL items): same code
    path as torchvision's CIFAR10 when the real data set is not on disk."""
    import numpy as np
    from PIL import Image

    class SyntheticCIFAR:
        def __init__(self) -> None:
            rng = np.random.default_rng(seed)
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = list(rng.integers(0, 10, n))

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int):
            return Image.fromarray(self.data[i]), int(self.targets[i])

    return SyntheticCIFAR()


def loader_throughput(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    from lightning_ood.data import torchvision_sets
    from lightning_ood.data.torchvision_sets import CIFAR10DataModule

    try:
        torchvision_sets.open_torchvision("cifar10", args.data_root, True, False)
        data_note = f"CIFAR-10 from {args.data_root}"
    except FileNotFoundError:
        n = 2000 if args.tiny else 50_000
        fakes = {True: _synthetic_cifar(n, 0), False: _synthetic_cifar(n // 5, 1)}
        torchvision_sets.open_torchvision = lambda name, root, train, download: fakes[train]
        data_note = "synthetic CIFAR-10-shaped uint8 data (CIFAR-10 not found; same PIL code path)"
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu":
        args.precision = "32-true" if args.precision == "bf16-mixed" else args.precision
    setups = [("DataLoader", "32-true", False, False),
              ("DataLoader", args.precision, True, args.compile),
              ("device_loader", args.precision, True, args.compile)]
    rows = []
    for path, precision, channels_last, compile_ in setups:
        pl.seed_everything(0)
        dm = CIFAR10DataModule(root=args.data_root, batch_size=args.loader_batch, num_workers=args.workers,
                               val_size=1000, device_loader=path == "device_loader", mean=(0.5,) * 3, std=(0.5,) * 3)
        model = OODClassifier(num_classes=10, width=args.width, lr=0.1, scheduler="none",
                              channels_last=channels_last, compile=compile_)
        timer = ThroughputTimer(args.loader_warmup)
        trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_epochs=1,
                             limit_train_batches=args.loader_batches, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[timer])
        trainer.fit(model, datamodule=dm)
        rows.append({"path": path, "precision": precision,
                     "flags": f"{'yes' if channels_last else 'no'} / {'yes' if compile_ else 'no'}",
                     "ips": timer.images_per_s})
        print(f"  {path:<14} {precision:<11} {rows[-1]['flags']}: {rows[-1]['ips']:,.0f} images/s", flush=True)
    device = torch.cuda.get_device_name(0) if accelerator == "gpu" else _common.machine()
    note = (f"{device}; {data_note}; ResNet18 (width {args.width}, CIFAR stem), batch {args.loader_batch}, "
            f"{args.loader_batches} steps of which {args.loader_warmup} warm-up (compile included there); "
            f"DataLoader with {args.workers} workers")
    return rows, note


# ----------------------------------------------------------------------------- tables
def _meets(ratio: float, target: Optional[float]) -> str:
    return "—" if target is None else ("yes" if ratio <= target else "**no**")


def objective_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        target = r["target"]
        med, q1, q3 = r["round"]
        out.append([r["loss"], f"{r['median_ms']:,.0f} / {r['cpu_ms']:,.0f}",
                    f"{r['ratio']:.3f} / {r['cpu_ratio']:.3f}", f"{med:.3f} [{q1:.3f}, {q3:.3f}]",
                    "—" if target is None else f"≤ {target:.2f}",
                    "—" if target is None else f"{_meets(r['ratio'], target)} / {_meets(r['cpu_ratio'], target)}",
                    f"{r['head_ms']:.2f}", f"{r['implied']:.4f}"])
    return _common.markdown_table(OBJECTIVE_COLUMNS, out)


def lightning_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        target = LIGHTNING_TARGET if r["loop"] == "Trainer.fit" else None
        out.append([r["loop"], f"{r['median_ms']:,.0f} / {r['cpu_ms']:,.0f}",
                    f"{r['ratio']:.3f} / {r['cpu_ratio']:.3f}", "—" if target is None else f"≤ {target:.2f}",
                    "—" if target is None else f"{_meets(r['ratio'], target)} / {_meets(r['cpu_ratio'], target)}",
                    r["n"], f"{r['total']:.1f}"])
    return _common.markdown_table(LIGHTNING_COLUMNS, out)


def loader_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["ips"]
    return _common.markdown_table(LOADER_COLUMNS, [
        [r["path"], r["precision"], r["flags"], f"{r['ips']:,.0f}", f"{r['ips'] / base:.2f}x"] for r in rows])


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run; prints, writes nothing")
    parser.add_argument("--width", type=int, default=64, help="ResNet18 width (64 = the standard ResNet18)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per objective")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    parser.add_argument("--blocks", type=int, default=2, help="alternating plain / Trainer.fit blocks each")
    parser.add_argument("--block-steps", type=int, default=6, help="steps per block")
    parser.add_argument("--block-warmup", type=int, default=1, help="steps dropped at the start of every block")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: robust on a shared machine, where OpenMP threads spin-wait)")
    parser.add_argument("--loaders", action="store_true",
                        help="part 3 only: standard DataLoader vs device_loader images/s (for a GPU)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (part 3)")
    parser.add_argument("--loader-batch", type=int, default=128)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--loader-warmup", type=int, default=30)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--output", type=Path, default=_common.BENCHMARKS_MD)
    args = parser.parse_args(argv)
    if args.tiny:
        args.width, args.batch, args.size, args.steps, args.warmup = 8, 8, 16, 3, 1
        args.blocks, args.block_steps, args.block_warmup = 2, 4, 1
        args.loader_batch, args.loader_batches, args.loader_warmup, args.workers = 16, 4, 1, 0
        args.compile = False
    if args.threads:
        torch.set_num_threads(args.threads)
    _common.quiet()
    start = time.perf_counter()

    if args.loaders:
        rows, note = loader_throughput(args)
        table = loader_table(rows)
        print("\n" + table)
        if args.tiny:
            return
        body = "\n".join(["## Training throughput on a GPU: DataLoader vs device_loader", "",
                          *_common.header_lines(time.perf_counter() - start), f"- {note}", "", table])
        _common.write_section("train_speed_gpu", body, args.output)
        return

    objectives = objective_steps(args)
    lightning = lightning_overhead(args)
    runtime = time.perf_counter() - start
    tables = [objective_table(objectives), lightning_table(lightning)]
    print("\n" + tables[0] + "\n\n" + tables[1])
    if args.tiny:  # smoke-test the --loaders code path too (on CPU it is no measurement)
        print("\n" + loader_table(loader_throughput(args)[0]))
    print(f"\ntotal runtime {runtime:.0f} s")
    if args.tiny:
        return
    body = "\n".join([
        "## Training speed (CPU): objectives vs CE, Lightning vs a plain loop",
        "",
        *_common.header_lines(runtime),
        f"- ResNet18 width {args.width} (CIFAR stem) at {args.size} px, batch {args.batch}, fp32, "
        "random data (the same batches for every objective), SGD Nesterov",
        "- every time is measured twice: wall clock (`perf_counter`) and CPU time of this process "
        "(`process_time`; with 1 torch thread it excludes time spent waiting for a core on a shared "
        "machine, so it is the steadier of the two when other jobs run)",
        f"- objectives: `training_step` + backward + SGD step, each step from the same initial weights "
        "and a fresh optimizer state (restored outside the timed region), interleaved one step each in rotating "
        f"order, {args.warmup} warm-up rounds then {args.steps} timed rounds; 'per-round ratio' = "
        "step time / CE step time of the same round; 'head + loss' = forward + backward of the head "
        "and loss alone on pooled features (all that differs between objectives); 'ratio implied' = "
        "1 + (its head + loss time − CE's) / CE's CPU step time: the overhead free of run-to-run noise; "
        "measured ratios within the per-round quartiles of 1 are noise",
        "",
        tables[0],
        "",
        f"- Lightning: {args.blocks} blocks of {args.block_steps} steps each for the plain loop and for "
        f"`Trainer.fit` (alternating, same DataLoader and shuffling seed, every block from the same initial "
        f"weights and a fresh optimizer, num_workers 0), first {args.block_warmup} steps of "
        "every block dropped; per-step = time between consecutive batch starts. Trainer without logger, "
        "checkpointing, progress bar and model summary; its `training_step` also updates the accuracy "
        "metric and calls `self.log`. 'end-to-end' = one block's `fit()` / loop wall time, set-up included",
        "",
        tables[1],
    ])
    _common.write_section("train_speed", body, args.output)


if __name__ == "__main__":
    main()
