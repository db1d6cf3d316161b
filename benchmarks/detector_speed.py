"""Detector scoring speed: lightning_ood vs pytorch-ood 0.4.0 on the same tensors (issue 14).

For every detector the two libraries share, the scoring alone (fitting excluded) is timed on
the same synthetic features and logits, with one thread and with all threads, for
B = 256 / 10,000 rows and (D, C) = (512, 10) / (2048, 1000). The two libraries' runs are
interleaved (ours, theirs, ours, ...), medians are reported with the ratio ours / theirs.
Ours is ``detector.score(outputs)`` inside
:func:`~lightning_ood.detectors.functional.finite_inputs_checked` (how OODModel and the
evaluation score a bundle); the once-per-bundle ``ForwardOutputs.check_finite()`` is its own
row per (B, D, C), shared by all detectors. Both libraries get the same hyper-parameters, and
their AUROCs on the same synthetic ID/OOD features are compared (equal definitions must give
equal AUROCs).

pytorch-ood is a benchmark-only extra (``pip install -e .[bench]``, or
``pip install pytorch-ood==0.4.0 --no-deps``); without it the script still runs ours and says
that the peer columns are skipped. ``--tiny`` is a seconds-long smoke run that writes nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from lightning_ood.detectors import (  # noqa: E402
    ASH, DICE, FDBD, GEN, KNN, MSP, NCI, SCALE, Energy, FitData, ForwardOutputs, Mahalanobis, MaxLogit, ReAct,
    RelativeMahalanobis, VirtualLogitMatching,
)
from lightning_ood.detectors.functional import finite_inputs_checked  # noqa: E402

try:  # the peer library is a benchmark-only extra
    import pytorch_ood
    from pytorch_ood import detector as pood
except ImportError:  # pragma: no cover - depends on the environment
    pytorch_ood = None
    pood = None

PEER_VERSION = "0.4.0"
#: the hyper-parameters both libraries get (ours on the 0-100 scale, theirs as fractions)
ASH_P, SCALE_P, REACT_P, DICE_P, KNN_K, GEN_GAMMA, GEN_M, NCI_ALPHA = 90.0, 85.0, 90.0, 90.0, 50, 0.1, 100, 1e-4
#: a peer Mahalanobis/RMD run above this many flops (its per-class loop: C x 2BD^2) is timed on
#: a subset of the classes and extrapolated linearly in C (marked "≈")
PEER_FLOP_LIMIT = 2.5e11
#: a peer DICE run whose (B, C, D) float32 product would exceed this many bytes is not run
PEER_DICE_BYTES = 4e9

COLUMNS = ["threads", "B", "D", "C", "detector (ours / pytorch-ood)", "ours ms", "pytorch-ood ms", "ours / theirs",
           "runs"]
AUROC_COLUMNS = ["D", "C", "detector (ours / pytorch-ood)", "ours AUROC %", "pytorch-ood AUROC %", "difference",
                 "note"]


# ----------------------------------------------------------------------------- data
@dataclass
class Problem:
    """Synthetic post-ReLU features of C Gaussian-ish classes, a linear head that separates
    them, ID training features (every class present) and ID / OOD evaluation features."""

    D: int
    C: int
    head: nn.Linear
    train: Tensor
    labels: Tensor
    eval_features: Tensor  # the timed rows (ID and OOD mixed)
    id_features: Tensor
    ood_features: Tensor

    def outputs(self, features: Tensor) -> ForwardOutputs:
        with torch.no_grad():
            return ForwardOutputs(self.head(features), features)


def make_problem(D: int, C: int, n_train: int, n_eval: int, n_auroc: int, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    means = torch.relu(torch.randn(C, D, generator=g)) * 1.5

    def id_rows(n: int) -> Tensor:
        y = torch.randint(0, C, (n,), generator=g)
        return torch.relu(means[y] + torch.randn(n, D, generator=g))

    def ood_rows(n: int) -> Tensor:  # between two classes, a little wider
        a, b = torch.randint(0, C, (n,), generator=g), torch.randint(0, C, (n,), generator=g)
        return torch.relu(0.5 * (means[a] + means[b]) + 1.2 * torch.randn(n, D, generator=g))

    head = nn.Linear(D, C)
    with torch.no_grad():
        # centred class means plus noise (exactly centred rows would leave W rank C - 1)
        centred = means - means.mean(0, keepdim=True) + 0.3 * torch.randn(C, D, generator=g)
        head.weight.copy_(centred / centred.norm(dim=1, keepdim=True) * 2.0)
        head.bias.copy_(0.1 * torch.randn(C, generator=g))
    labels = torch.arange(n_train) % C  # every class present (pytorch-ood's Mahalanobis asserts it)
    train = torch.relu(means[labels] + torch.randn(n_train, D, generator=g))
    half = n_eval // 2
    eval_features = torch.cat([id_rows(half), ood_rows(n_eval - half)])
    eval_features = eval_features[torch.randperm(n_eval, generator=g)].contiguous()
    return Problem(D, C, head, train, labels, eval_features, id_rows(n_auroc), ood_rows(n_auroc))


# ----------------------------------------------------------------------------- detectors
@dataclass
class Pair:
    """One shared detector: ours (fitted, attached) and a callable scoring with theirs."""

    label: str
    ours: Any
    theirs: Optional[Callable[[ForwardOutputs], Tensor]] = None
    peer_note: str = ""  # why theirs is not run / is extrapolated at a size
    peer_plan: Optional[Callable[[int], tuple[Optional[Callable[[ForwardOutputs], Tensor]], float, str]]] = None
    extra: dict[str, Any] = field(default_factory=dict)


def _fit_ours(detector: Any, problem: Problem) -> Any:
    detector.attach(problem.head)
    with torch.no_grad():
        logits = problem.head(problem.train)
    detector.fit(FitData(features=problem.train, labels=problem.labels, logits=logits))
    return detector


def build_pairs(problem: Problem) -> list[Pair]:
    """Our detectors fitted through our API and theirs through ``fit_features`` (or
    equivalent), on the same training features, with the same hyper-parameters."""
    D, C, head = problem.D, problem.C, problem.head
    vim_dim = 1000 if D >= 2048 else (512 if D >= 768 else D // 2)  # the authors' rule, also ours by default
    gen_m = min(GEN_M, C)
    ours = {
        "msp": MSP(), "max_logit": MaxLogit(), "energy": Energy(),
        "ash_p": ASH("p", ASH_P), "ash_b": ASH("b", ASH_P), "ash_s": ASH("s", ASH_P),
        "scale": SCALE(SCALE_P), "react": ReAct(REACT_P), "dice": DICE(DICE_P), "knn": KNN(k=KNN_K),
        "vim": VirtualLogitMatching(principal_dim=vim_dim), "gen": GEN(GEN_GAMMA, gen_m),
        "mahalanobis": Mahalanobis(), "rmd": RelativeMahalanobis(), "nci": NCI(alpha=NCI_ALPHA), "fdbd": FDBD(),
    }
    for detector in ours.values():
        _fit_ours(detector, problem)
    names = {"msp": "MaxSoftmax", "max_logit": "MaxLogit", "energy": "EnergyBased", "ash_p": "ASH (ash-p)",
             "ash_b": "ASH (ash-b)", "ash_s": "ASH (ash-s)", "scale": "SCALE", "react": "ReAct", "dice": "DICE",
             "knn": "KNN", "vim": "ViM", "gen": "GEN", "mahalanobis": "Mahalanobis", "rmd": "RMD", "nci": "NCI",
             "fdbd": "fDBD"}
    pairs = {key: Pair(f"{key} / {names[key]}", detector) for key, detector in ours.items()}
    if pood is None:
        return list(pairs.values())

    y, train = problem.labels, problem.train
    head4d = lambda x: head(x.flatten(1))  # their ASH / SCALE shape 4-D feature maps
    maps = lambda o: o.features[:, :, None, None]
    peers: dict[str, Any] = {
        "msp": pood.MaxSoftmax(None), "max_logit": pood.MaxLogit(None), "energy": pood.EnergyBased(None),
        "gen": pood.GEN(None, gamma=GEN_GAMMA, M=gen_m),
    }
    for key in ("msp", "max_logit", "energy", "gen"):
        pairs[key].theirs = (lambda p: lambda o: p.predict_logits(o.logits))(peers[key])
    for key, variant in (("ash_p", "ash-p"), ("ash_b", "ash-b"), ("ash_s", "ash-s")):
        peer = pood.ASH(backbone=None, head=head4d, variant=variant, percentile=ASH_P / 100)
        pairs[key].theirs = (lambda p: lambda o: p.predict_feature_maps(maps(o)))(peer)
    scale = pood.SCALE(backbone=None, head=head4d, percentile=SCALE_P / 100)
    pairs["scale"].theirs = lambda o: scale.predict_feature_maps(maps(o))
    react = pood.ReAct(backbone=None, head=head, percentile=REACT_P / 100).fit_feature_maps(train, y)
    pairs["react"].theirs = lambda o: react.predict_feature_maps(o.features)
    dice = pood.DICE(None, head.weight, head.bias, p=DICE_P / 100).fit_features(train, y)
    pairs["dice"].theirs = lambda o: dice.predict_features(o.features)
    knn = pood.KNN(None, k=KNN_K).fit_features(train, y)
    pairs["knn"].theirs = lambda o: knn.predict_features(o.features)
    pairs["knn"].extra["sklearn"] = knn.knn
    vim = pood.ViM(None, d=vim_dim, w=head.weight, b=head.bias).fit_features(train, y)
    pairs["vim"].theirs = lambda o: vim.predict_features(o.features)
    maha = pood.Mahalanobis(None).fit_features(train, y)
    rmd = pood.RMD(None).fit_features(train, y)
    for key, peer in (("mahalanobis", maha), ("rmd", rmd)):
        pairs[key].theirs = (lambda p: lambda o: p.predict_features(o.features))(peer)
        pairs[key].peer_plan = (lambda p: lambda b: _gaussian_plan(p, b, D, C))(peer)
    nci = pood.NCI(None, head, alpha=NCI_ALPHA).fit_features(train)
    pairs["nci"].theirs = lambda o: nci.predict_features(o.features)
    fdbd = pood.fDBD(None, head).fit_features(train)
    pairs["fdbd"].theirs = lambda o: fdbd.predict_features(o.features)
    pairs["dice"].peer_plan = lambda b: ((None, 1.0, f"not run: their score builds a (B, C, D) float32 tensor, "
                                                     f"{b * C * D * 4 / 1e9:.0f} GB")
                                         if b * C * D * 4 > PEER_DICE_BYTES else (pairs["dice"].theirs, 1.0, ""))
    return list(pairs.values())


def _gaussian_plan(peer: Any, rows: int, D: int, C: int) -> tuple[Callable[[ForwardOutputs], Tensor], float, str]:
    """pytorch-ood's Mahalanobis / RMD loop over the C classes, one (B, D) x (D, D) product
    each: above PEER_FLOP_LIMIT it is timed on the first n classes and scaled by C / n."""
    per_class = 2.0 * rows * D * D
    if C * per_class <= PEER_FLOP_LIMIT:
        return (lambda o: peer.predict_features(o.features)), 1.0, ""
    n = max(1, min(C, int(PEER_FLOP_LIMIT // per_class)))
    probe = copy.copy(peer)
    probe.mu = peer.mu[:n]
    return (lambda o: probe.predict_features(o.features)), C / n, f"≈: {n} of {C} classes timed, x {C / n:g}"


# ----------------------------------------------------------------------------- timing
@contextlib.contextmanager
def thread_limits(threads: int):
    """torch threads and (for scikit-learn / NumPy inside pytorch-ood's KNN) BLAS and
    OpenMP threads, set to ``threads`` for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(limits=threads)
    except ImportError:  # pragma: no cover - scikit-learn depends on threadpoolctl
        limiter = contextlib.nullcontext()
    try:
        with limiter:
            yield
    finally:
        torch.set_num_threads(before)


#: A timed sample is at least this long: a sub-millisecond call is repeated within the sample
#: (a single 0.1 ms call is at the mercy of OS jitter) and its mean per call is the sample.
SAMPLE_S = 0.02


def _seconds(fn: Callable[[], Any], calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def time_pair(ours: Callable[[], Any], theirs: Optional[Callable[[], Any]], repeats: int, min_repeats: int,
              budget_s: float) -> tuple[float, Optional[float], int]:
    """Median seconds per call of ``ours`` and ``theirs``, interleaved (the order alternates
    every round). One untimed warm-up each unless it took longer than a second (then it
    counts); as many rounds as fit ``budget_s``, at least ``min_repeats``, at most
    ``repeats``; a round's sample of a call shorter than :data:`SAMPLE_S` averages as many
    calls as fill it."""
    calls = [("ours", ours)] + ([("theirs", theirs)] if theirs is not None else [])
    samples: dict[str, list[float]] = {name: [] for name, _ in calls}
    warm = {name: _seconds(fn) for name, fn in calls}
    for name, seconds in warm.items():
        if seconds > 1.0:
            samples[name].append(seconds)
    inner = {name: max(1, min(1000, math.ceil(SAMPLE_S / max(seconds, 1e-9)))) for name, seconds in warm.items()}
    per_round = sum(warm[name] * inner[name] for name in warm)
    rounds = max(min_repeats, min(repeats, int(budget_s / max(per_round, 1e-9))))
    rounds -= min(len(v) for v in samples.values())
    for r in range(max(rounds, 0)):
        for name, fn in (calls if r % 2 == 0 else calls[::-1]):
            samples[name].append(_seconds(fn, inner[name]))
    med = {name: statistics.median(values) for name, values in samples.items()}
    return med["ours"], med.get("theirs"), min(len(v) for v in samples.values())


def speed_rows(problem: Problem, pairs: list[Pair], threads: int, batches: list[int], args: argparse.Namespace,
               log: Callable[[str], None]) -> list[list[Any]]:
    rows = []
    for b in batches:
        outputs = problem.outputs(problem.eval_features[:b])
        check_s, _, runs = time_pair(lambda: outputs.check_finite(), None, args.repeats * 3, args.min_repeats * 3,
                                     args.budget_s)
        rows.append([threads, f"{b:,}", problem.D, problem.C, "(bundle check: `ForwardOutputs.check_finite()`, "
                     "once per batch for all detectors)", f"{check_s * 1e3:,.2f}", "-", "-", runs])
        for pair in pairs:
            ours = lambda: pair.ours.score(outputs)
            theirs, factor, note = pair.theirs, 1.0, ""
            if pair.peer_plan is not None and theirs is not None:
                theirs, factor, note = pair.peer_plan(b)
            if pair.extra.get("sklearn") is not None:
                pair.extra["sklearn"].n_jobs = threads  # their KNN fixes n_jobs=-1; one thread means one
            with torch.inference_mode():
                def run_ours() -> None:
                    with finite_inputs_checked():
                        ours()
                peer_call = None if theirs is None else (lambda: theirs(outputs))
                ours_s, theirs_s, runs = time_pair(run_ours, peer_call, args.repeats, args.min_repeats, args.budget_s)
            if theirs_s is None:
                peer_cell, ratio = (note or ("not installed" if pood is None else "-")), "-"
            else:
                theirs_s *= factor
                peer_cell = ("≈ " if factor != 1.0 else "") + f"{theirs_s * 1e3:,.2f}"
                ratio = ("≈ " if factor != 1.0 else "") + f"{ours_s / theirs_s:.2f}"
                ratio = f"**{ratio}**" if ours_s > theirs_s * 1.05 else ratio
            label = pair.label + (f" ({note})" if note and theirs_s is not None else "")
            rows.append([threads, f"{b:,}", problem.D, problem.C, label, f"{ours_s * 1e3:,.2f}", peer_cell, ratio, runs])
            log(" | ".join(str(c) for c in rows[-1]))
    return rows


# ----------------------------------------------------------------------------- AUROC
def auroc(id_scores: Tensor, ood_scores: Tensor) -> float:
    """P(ID score > OOD score) + half the ties (higher = ID), via ranks."""
    scores = torch.cat([id_scores, ood_scores]).double()
    ranks = _average_ranks(scores)
    n_id, n_ood = len(id_scores), len(ood_scores)
    return float((ranks[:n_id].sum() - n_id * (n_id + 1) / 2) / (n_id * n_ood))


def _average_ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    start = 0
    n = len(x)
    boundaries = torch.nonzero(sorted_x[1:] != sorted_x[:-1]).flatten().tolist() + [n - 1]
    for end in boundaries:
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


AUROC_NOTES = {
    "knn": "theirs: plain distance (sklearn), ours: -distance; same ranking",
    "mahalanobis": "theirs: 0.5 x squared distance under inv(sum of outer products + 1e-6 I); same ranking up to "
                   "the ridge / pseudo-inverse",
    "rmd": "theirs: (MD_c - MD_0) / N under inv(sums + 1e-6 I); same ranking up to the ridge / pseudo-inverse",
    "gen": "theirs: mean (ours: sum) over the top M, p clamped to [1e-7, 1 - 1e-7]; ours exact in log space",
    "vim": "theirs: float32 covariance / eigh, ours float64",
    "dice": "theirs: float32 contributions / torch.quantile, ours float64",
}


def auroc_rows(problem: Problem, pairs: list[Pair], skip_peer: dict[str, str], log: Callable[[str], None]) -> list[list[Any]]:
    rows = []
    id_out, ood_out = problem.outputs(problem.id_features), problem.outputs(problem.ood_features)
    for pair in pairs:
        key = pair.label.split(" /")[0]
        with torch.inference_mode():
            ours = auroc(pair.ours.score(id_out).float(), pair.ours.score(ood_out).float())
            theirs = None
            note = AUROC_NOTES.get(key, "")
            if pair.theirs is not None and key not in skip_peer:
                # their scores are per row: chunks keep their (B, C, D) DICE product small
                peer = lambda o: torch.cat([pair.theirs(ForwardOutputs(o.logits[i:i + 100], o.features[i:i + 100]))
                                            for i in range(0, len(o.logits), 100)])
                theirs = auroc(-peer(id_out).double(), -peer(ood_out).double())  # theirs: higher = OOD
            elif pair.theirs is not None:
                note = f"theirs not run here ({skip_peer[key]})"
        diff = "-" if theirs is None else f"{100 * (ours - theirs):+.3f}"
        flag = theirs is not None and abs(ours - theirs) > 5e-4
        rows.append([problem.D, problem.C, pair.label, f"{100 * ours:.2f}",
                     "-" if theirs is None else f"{100 * theirs:.2f}", f"**{diff}**" if flag else diff, note])
        log(" | ".join(str(c) for c in rows[-1]))
    return rows


# ----------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run; prints, writes nothing")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch (and BLAS/OpenMP) thread counts; default 1 and all (os.cpu_count())")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 10_000])
    parser.add_argument("--shapes", nargs="+", default=["512x10", "2048x1000"], help="DxC feature width x classes")
    parser.add_argument("--train", type=int, default=5000, help="ID training rows (fit; the KNN bank)")
    parser.add_argument("--auroc-rows", type=int, default=1000, help="ID and OOD rows each for the AUROC check")
    parser.add_argument("--repeats", type=int, default=7, help="most interleaved rounds per cell")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest interleaved rounds per cell")
    parser.add_argument("--budget-s", type=float, default=3.0, help="seconds per cell that set the rounds")
    parser.add_argument("--output", type=Path, default=_common.BENCHMARKS_MD)
    args = parser.parse_args(argv)
    if args.tiny:
        args.threads, args.batches, args.shapes = [1], [64], ["32x5"]
        args.train, args.auroc_rows, args.repeats, args.min_repeats, args.budget_s = 200, 100, 1, 1, 0.1
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    _common.quiet()
    if pood is None:
        print("pytorch-ood is not installed: the pytorch-ood columns are skipped (pip install "
              f"pytorch-ood=={PEER_VERSION} --no-deps, or pip install -e .[bench])")
    elif pytorch_ood.__version__ != PEER_VERSION:
        print(f"note: pytorch-ood {pytorch_ood.__version__} installed, this comparison was written for {PEER_VERSION}")
    start = time.perf_counter()
    log = lambda line: print(line, flush=True)
    speed, quality = [], []
    for D, C in shapes:
        fit_start = time.perf_counter()
        problem = make_problem(D, C, args.train, max(args.batches), args.auroc_rows, seed=D + C)
        with thread_limits(max(threads)):
            pairs = build_pairs(problem)
        log(f"D={D} C={C}: data and fits (both libraries) {time.perf_counter() - fit_start:.1f} s")
        for t in threads:
            with thread_limits(t):
                speed += speed_rows(problem, pairs, t, args.batches, args, log)
        # theirs at C = 1000: the Mahalanobis / RMD loop (C products of (rows, D) x (D, D)) is too slow for
        # a 2 x auroc-rows check on a small CPU; the definitions are compared at the smaller C
        slow = {"mahalanobis", "rmd"} if C * 2.0 * args.auroc_rows * D * D > 20 * PEER_FLOP_LIMIT else set()
        skip = {k: "their per-class loop is too slow at this C; compared at the other shape" for k in slow}
        with thread_limits(max(threads)):
            quality += auroc_rows(problem, pairs, skip, log)
    runtime = time.perf_counter() - start
    tables = [_common.markdown_table(COLUMNS, speed), _common.markdown_table(AUROC_COLUMNS, quality)]
    print("\n" + "\n\n".join(tables))
    print(f"\ntotal runtime {runtime:.0f} s")
    if args.tiny:
        return
    peer = f"pytorch-ood {pytorch_ood.__version__}" if pood is not None else "pytorch-ood not installed"
    body = "\n".join([
        "## detector_speed", "",
        "Scoring speed of every detector lightning_ood shares with pytorch-ood, on the same tensors in one run "
        "(issue 14).", "",
        *_common.header_lines(runtime, f"- {peer}; `nproc` = {os.cpu_count()}; torch threads per row as listed "
                                       "(scikit-learn/BLAS/OpenMP threads limited to the same with threadpoolctl)"),
        f"- synthetic post-ReLU features (D, C as listed), a linear head; every detector fitted once on the same "
        f"{args.train:,} ID training rows (KNN bank = {args.train:,} rows); fitting is not timed",
        "- ours: `detector.score(outputs)` inside `finite_inputs_checked()`; the bundle check row is paid once per "
        "batch for all detectors. Theirs: `predict_logits` / `predict_features` / `predict_feature_maps` "
        "(pooled features as B x D x 1 x 1 maps for ASH / SCALE), which includes their head call where their API "
        "recomputes the logits from the features (NCI, fDBD, ViM)",
        f"- same hyper-parameters in both: ASH {ASH_P:g} % / {ASH_P / 100:g}, SCALE {SCALE_P:g}, ReAct {REACT_P:g}, "
        f"DICE {DICE_P:g}, KNN k = {KNN_K}, ViM D_p = the authors' rule, GEN gamma = {GEN_GAMMA}, M = min({GEN_M}, C), "
        f"NCI alpha = {NCI_ALPHA:g}",
        f"- interleaved rounds (ours, theirs, alternating order), medians; a round's sample of a call under "
        f"{SAMPLE_S * 1000:g} ms is the mean of as many calls as fill {SAMPLE_S * 1000:g} ms; between {args.min_repeats} and "
        f"{args.repeats} rounds per cell (budget {args.budget_s:g} s per cell), one warm-up each; ratio < 1: ours "
        "faster, **bold**: ours more than 5 % slower; ≈: extrapolated (see the row)",
        "",
        tables[0],
        "",
        f"AUROC (ID = positive, {args.auroc_rows:,} ID vs {args.auroc_rows:,} OOD synthetic rows, same fitted "
        "detectors); shared definitions must agree, **bold**: differ by more than 0.05 points:",
        "",
        tables[1],
    ])
    _common.write_section("detector_speed", body, args.output)


if __name__ == "__main__":
    main()
