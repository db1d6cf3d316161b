"""Throughput and memory of the WeiPer detector on random features (CPU).

WeiPer: Granz et al., NeurIPS 2024 (arXiv:2405.17164). Measures fit and score samples/s of
:class:`lightning_ood.detectors.weiper.WeiPer` for the CIFAR-10 (C=10, D=512) and ImageNet
(C=1000, D=2048) presets on ReLU'd Gaussian features, the peak resident memory of fitting
at two training-set sizes (streamed batches, so it must not grow with N), and the speed of
a reference-style loop: our own re-implementation of the shape of the authors' algorithm
(chunks of 100 samples, histograms by broadcast comparisons against the bin edges, a
100-channel Conv1d smoothing layer, a Python loop over the perturbed heads for the MSP).

Usage::

    python benchmarks/weiper_throughput.py            # full run, refreshes BENCHMARKS.md
    python benchmarks/weiper_throughput.py --tiny     # seconds-long smoke run, prints only
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ood.detectors.weiper import WeiPer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- weiper_throughput:start -->", "<!-- weiper_throughput:end -->"


# --------------------------------------------------------------------------- data
def random_features(n: int, dim: int, seed: int) -> Tensor:
    """(n, dim) ReLU'd standard Gaussians."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).relu_()


class StreamedFeatures:
    """Re-iterable batches generated on the fly, so the data set never sits in memory."""

    def __init__(self, n: int, dim: int, batch: int, seed: int) -> None:
        self.n, self.dim, self.batch, self.seed = n, dim, batch, seed

    def __iter__(self) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.n, self.batch):
            yield torch.randn(min(self.batch, self.n - start), self.dim, generator=gen).relu_()


def make_detector(preset: str, classes: int, dim: int) -> WeiPer:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(classes, dim, generator=gen) / dim ** 0.5
    return WeiPer.from_preset(preset, weight, torch.randn(classes, generator=gen) * 0.1)


# --------------------------------------------------------------------------- measuring
def best_seconds(fn: Callable[[], object], repeats: int,
                 warmup: bool = True) -> tuple[float, float]:
    """Fastest wall-clock and CPU (all threads) seconds of ``repeats`` calls, after one
    untimed warm-up call unless ``warmup`` is False. Minima are robust to other jobs on a
    shared machine; CPU seconds do not count the time this process waited for a core."""
    if warmup:
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def peak_tensor_mb(fn: Callable[[], object]) -> float:
    """Peak MB of torch CPU tensors allocated by ``fn`` and alive at the same time.

    Replays the allocation and free events recorded by ``torch.profiler`` (op
    granularity: a temporary freed inside the op that made it is not seen). Unlike the
    resident set size, this does not move when the kernel pages shared libraries out and
    back in, as it does on this machine.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


# --------------------------------------------------------------------------- reference style
class ReferenceStyleLoop:
    """Our re-implementation of the *shape* of the authors' WeiPer+KLD code, for timing only.

    Per chunk of 100 samples: histograms by comparing every value with every bin edge
    (values in slices of 1000 when a vector is longer), a Conv1d(100, 100, s,
    padding="same", padding_mode="replicate") with a diagonal box kernel for smoothing (the
    last chunk padded to 100 columns), and the KL by broadcasting; the MSP loops over the r
    heads in Python. Unlike the authors' code it keeps one W~ (theirs redraws it per batch,
    which would only make it slower).
    """

    def __init__(self, det: WeiPer) -> None:
        self.det = det
        self.classes = det.perturbed_weight.shape[0] // det.n_repeats
        self.kernels = [self._kernel(det.smoothing), self._kernel(det.smoothing_perturbed)]

    @staticmethod
    def _kernel(width: int) -> nn.Conv1d:
        conv = nn.Conv1d(100, 100, width, padding="same", padding_mode="replicate")
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[range(100), range(100)] = 1.0 / width
            conv.bias.zero_()
        return conv.requires_grad_(False)

    def _edges(self, lo: float, hi: float) -> Tensor:
        n = self.det.n_bins
        inner = lo + torch.arange(n + 1, dtype=torch.float32) / n * (hi - lo)
        inf = torch.tensor([float("inf")])
        return torch.cat([-inf, inner, inf])

    def _densities(self, values: Tensor, lo: float, hi: float) -> Tensor:
        """(n_bins, N) per-sample histograms, one chunk of 100 samples at a time."""
        edges = self._edges(lo, hi)[:, None, None]
        out = []
        for chunk in values.split(100):
            columns = chunk.T
            counts = torch.zeros(len(edges) - 1, chunk.shape[0])
            for part in columns.split(1000):
                inside = (part[None] < edges[1:]) & (part[None] >= edges[:-1])
                counts += inside.float().sum(dim=1)
            out.append(counts[1:-1] / columns.shape[0])
        return torch.cat(out, dim=1)

    def _project(self, z: Tensor) -> Tensor:
        return torch.cat([torch.addmm(self.det.perturbed_bias, x, self.det.perturbed_weight.t())
                          for x in z.split(200)])

    def _kl(self, train: Tensor, dens: Tensor, kernel: nn.Conv1d, eps: float) -> Tensor:
        p = train[:, None] + eps
        p = p / p.sum(dim=0)
        result = []
        for chunk in dens.split(100, dim=1):
            size = chunk.shape[1]
            if size < 100:
                chunk = torch.cat([chunk, torch.ones(chunk.shape[0], 100 - size)], dim=1)
            q = kernel(chunk.T).T + eps
            q = q / q.sum(dim=0)
            kl = (p * (p.log() - q.log())).sum(dim=0) + (q * (q.log() - p.log())).sum(dim=0)
            result.append(kl[:size])
        return torch.cat(result)

    @torch.no_grad()
    def fit(self, features: Tensor, batch: int = 1000) -> None:
        lows, highs = [], []
        for x in features.split(batch):
            logits = self._project(x)
            lows.append(torch.stack([x.min(), logits.min()]))
            highs.append(torch.stack([x.max(), logits.max()]))
        lo, hi = torch.stack(lows).amin(0).tolist(), torch.stack(highs).amax(0).tolist()
        self.ranges = [(lo[0], hi[0]), (lo[1], hi[1])]
        sums = [torch.zeros(self.det.n_bins), torch.zeros(self.det.n_bins)]
        for x in features.split(batch):
            sums[0] += self._densities(x, *self.ranges[0]).sum(dim=1)
            sums[1] += self._densities(self._project(x), *self.ranges[1]).sum(dim=1)
        self.train = [s / len(features) for s in sums]

    @torch.no_grad()
    def score(self, z: Tensor) -> Tensor:
        det, logits = self.det, self._project(z)
        msp = torch.stack([logits[:, i * self.classes:(i + 1) * self.classes].softmax(-1).amax(-1)
                           for i in range(det.n_repeats)], dim=1).mean(dim=1)
        d_z = self._kl(self.train[0], self._densities(z, *self.ranges[0]), self.kernels[0],
                       det.eps_z)
        d_w = self._kl(self.train[1], self._densities(logits, *self.ranges[1]),
                       self.kernels[1], det.eps_perturbed)
        return -(d_z + det.lambda1 * d_w - det.lambda2 * msp)


# --------------------------------------------------------------------------- benchmark
def run_case(name: str, preset: str, classes: int, dim: int, sizes: dict[str, int],
             repeats: int, threads: int) -> list[dict[str, object]]:
    """All measurements of one preset/shape at one thread count."""
    torch.set_num_threads(threads)
    det = make_detector(preset, classes, dim)
    train = random_features(sizes["fit"], dim, seed=1)
    test = random_features(sizes["score"], dim, seed=2) * 1.2
    fit_s = best_seconds(lambda: det.fit_features(train), repeats)
    score_s = best_seconds(lambda: det.score_features(test), repeats)
    mem = [peak_tensor_mb(lambda n=n: det.fit_features(StreamedFeatures(n, dim, 256, 3)))
           for n in (sizes["mem_small"], sizes["mem_large"])]
    score_mem = peak_tensor_mb(lambda: det.score_features(test))
    ref = ReferenceStyleLoop(det)
    ref_train, ref_test = train[:sizes["ref_fit"]], test[:sizes["ref_score"]]
    ref_fit_s = best_seconds(lambda: ref.fit(ref_train), 1, warmup=False)
    ref_score_s = best_seconds(lambda: ref.score(ref_test), 1, warmup=False)
    det.fit_features(ref_train)
    ours_on_ref = det.score_features(ref_test)
    agreement = torch.corrcoef(torch.stack([ours_on_ref, ref.score(ref_test)]))[0, 1].item()
    mem_text = (f"{_mb(mem[0])} / {_mb(mem[1])} (N = {sizes['mem_small']:,} / "
                f"{sizes['mem_large']:,})")
    common = {"case": name, "threads": threads,
              "w_mb": det.perturbed_weight.numel() * 4 / 2**20, "agreement": agreement}
    return [
        {**common, "phase": "fit", "n": len(train), "secs": fit_s, "mem": mem_text,
         "ref_n": len(ref_train), "ref_secs": ref_fit_s},
        {**common, "phase": "score", "n": len(test), "secs": score_s, "mem": _mb(score_mem),
         "ref_n": len(ref_test), "ref_secs": ref_score_s},
    ]


def _mb(value: float) -> str:
    return f"{value:,.1f}"


def markdown_table(rows: list[dict[str, object]]) -> str:
    lines = ["| case | threads | phase | N | samples/s (wall) | samples/CPU-s | peak MB "
             "| reference-style loop samples/s (wall, N) | speed-up (wall) | W~ MB "
             "| corr. with ref-style |", "|" + "---|" * 11]
    for r in rows:
        wall, cpu = r["secs"]
        ref_wall = r["ref_secs"][0]
        lines.append(
            f"| {r['case']} | {r['threads']} | {r['phase']} | {r['n']:,} | {r['n'] / wall:,.0f} "
            f"| {r['n'] / cpu:,.0f} | {r['mem']} | {r['ref_n'] / ref_wall:,.1f} "
            f"({r['ref_n']:,}) | {ref_wall / r['ref_n'] * r['n'] / wall:,.0f}x "
            f"| {r['w_mb']:,.0f} | {r['agreement']:.4f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def load_average() -> float:
    """1-minute load average (NaN where the OS does not report it)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def write_section(path: Path, body: str) -> None:
    """Replace (or append) this script's delimited section of ``path``."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{START}\n{body}\n{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke run with reduced sizes; prints, writes nothing")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch thread counts to measure (default: torch's default)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="markdown file whose weiper_throughput section is refreshed")
    args = parser.parse_args(argv)

    if args.tiny:
        cases = [("cifar10", "cifar10", 10, 512, dict(fit=400, score=200, mem_small=100,
                                                        mem_large=400, ref_fit=100,
                                                        ref_score=100), 1),
                 ("imagenet (reduced shape C=20, D=128)", "imagenet", 20, 128,
                  dict(fit=100, score=50, mem_small=50, mem_large=200, ref_fit=50,
                       ref_score=50), 1)]
    else:
        cases = [("cifar10 (C=10, D=512)", "cifar10", 10, 512,
                  dict(fit=50_000, score=10_000, mem_small=10_000, mem_large=100_000,
                       ref_fit=5_000, ref_score=2_000), 3),
                 ("imagenet (C=1000, D=2048)", "imagenet", 1000, 2048,
                  dict(fit=1_024, score=1_024, mem_small=256, mem_large=1_024, ref_fit=200,
                       ref_score=200), 2)]
    started = time.perf_counter()
    load = load_average()
    rows = [row for threads in args.threads for name, preset, c, d, sizes, repeats in cases
            for row in run_case(name, preset, c, d, sizes, repeats, threads)]
    table = markdown_table(rows)
    print(table)
    if args.tiny:
        return
    command = "python benchmarks/weiper_throughput.py " + " ".join(sys.argv[1:])
    body = "\n".join([
        "## WeiPer throughput (CPU)",
        "",
        f"- machine: {machine()}; torch {torch.__version__}; "
        f"date {datetime.date.today().isoformat()}; runtime "
        f"{(time.perf_counter() - started) / 60:.1f} min; 1-min load average at start "
        f"{load:.2f}, at end {load_average():.2f}",
        f"- command: `{command.strip()}`",
        "- random ReLU'd Gaussian features; presets from docs/methods.md (r = 100, 100 bins); "
        "best of several runs; fit reads the data twice (global min/max, then bin counts)",
        "- samples/s (wall) suffers from other jobs on this shared machine (see the load "
        "average); samples/CPU-s counts only the CPU time of this process (all threads), "
        "i.e. what an otherwise idle core achieves in the 1-thread rows",
        "- peak MB: torch CPU tensors alive at the same time during the call (replay of the "
        "profiler's allocation events; W~ and the input features excluded); fit memory on "
        "batches of 256 generated on the fly, at two N",
        "- reference-style loop (our re-implementation): the shape of the authors' code "
        "(chunks of 100 samples, broadcast edge comparisons, Conv1d smoothing, Python loop "
        "over the r heads), one W~, measured on the smaller N in brackets; 'corr.' is the "
        "Pearson correlation of its scores with ours on the same fit",
        "",
        table,
    ])
    write_section(args.output, body)
    print(f"\nwrote the weiper_throughput section of {args.output}")


if __name__ == "__main__":
    main()
