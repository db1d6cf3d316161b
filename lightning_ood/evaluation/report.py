"""The OOD report: results dict, console table, results.json/csv, plots and W&B logging."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Sequence

import torch
from torch import Tensor

from lightning_ood.io import atomic_write_text
from lightning_ood.evaluation.metrics import ood_metrics

METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")
GROUP_METRICS = ("auroc", "fpr95")


def build_results(
    id_name: str,
    set_names: Sequence[str],
    groups: dict[str, str],
    per_set: Sequence[dict[str, Tensor]],
    detector_names: Sequence[str],
    kept: Sequence[int],
    changes_logits: Sequence[bool],
    skipped: dict[str, str],
    detector_info: dict[str, Any],
    fpr95_positive: str,
    devices: int,
) -> dict[str, Any]:
    """The results dictionary written to ``results.json`` (fractions in [0, 1]).

    ``per_set[0]`` is the ID test set, ``per_set[i]`` the OOD set ``set_names[i]``; each has
    ``scores`` (N, n_detectors) and, for the ID set, ``labels`` and ``predictions`` (N, 1 +
    one column per detector that changes the logits).
    """
    id_data = per_set[0]
    labels, predictions = id_data["labels"], id_data["predictions"]
    accuracy = float((predictions[:, 0] == labels).float().mean())
    by_detector, column = {}, 1
    for i, name in enumerate(detector_names):
        if changes_logits[i]:
            if i in kept:
                by_detector[name] = float((predictions[:, column] == labels).float().mean())
            column += 1
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for i in kept:
        name = detector_names[i]
        rows = {}
        for set_name, data in zip(set_names[1:], per_set[1:]):
            rows[set_name] = ood_metrics(id_data["scores"][:, i], data["scores"][:, i], fpr95_positive)
        for group in ("near", "far"):
            members = [s for s in set_names[1:] if groups.get(s) == group]
            if members:
                rows[group] = {m: sum(rows[s][m] for s in members) / len(members) for m in GROUP_METRICS}
        metrics[name] = rows
    return {
        "id": {"dataset": id_name, "n": len(labels), "accuracy": accuracy, "accuracy_by_detector": by_detector},
        "ood": {s: {"n": len(d["indices"]), "group": groups.get(s, "far")} for s, d in zip(set_names[1:], per_set[1:])},
        "metrics": metrics,
        "skipped": dict(skipped),
        "detectors": {detector_names[i]: detector_info[detector_names[i]] for i in kept},
        "fpr95_positive": fpr95_positive,
        "devices": devices,
    }


def format_table(results: dict[str, Any], metric: str = "auroc") -> str:
    """A plain-text table: rows = detectors, columns = OOD sets + near/far means (in %)."""
    sets = list(results["ood"])
    groups = [g for g in ("near", "far") if any(v["group"] == g for v in results["ood"].values())]
    header = ["detector"] + sets + [f"{g} mean" for g in groups]
    rows = [[name] + [f"{100 * row[c][metric]:.2f}" for c in sets + groups] for name, row in results["metrics"].items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summary_text(results: dict[str, Any]) -> str:
    """The console report: ID accuracy, sample counts, AUROC and FPR95 tables, skips."""
    id_info = results["id"]
    lines = [f"ID {id_info['dataset']}: n={id_info['n']}, accuracy={100 * id_info['accuracy']:.2f}%"]
    for name, acc in id_info["accuracy_by_detector"].items():
        lines.append(f"  accuracy with {name}-shaped logits: {100 * acc:.2f}%")
    lines += [f"OOD {s}: n={v['n']} ({v['group']})" for s, v in results["ood"].items()]
    positive = "OOD" if results["fpr95_positive"] == "ood" else "ID"
    lines += ["", "AUROC % (higher is better)", format_table(results, "auroc"), "",
              f"FPR@95%TPR % (lower is better; positive class = {positive})", format_table(results, "fpr95")]
    for name, entry in results.get("tuning", {}).items():
        if "parameters" in entry:
            chosen = ", ".join(f"{k}={v}" for k, v in entry["parameters"].items())
            default = ", ".join(f"{k}={v}" for k, v in entry["default"].items())
            lines.append(f"tuned {name} on {entry['split']}: {chosen} (published default: {default})")
        elif entry.get("values") == "configured":
            lines.append(f"{name}: as configured (tune=defaults)")
        else:
            lines.append(f"{name}: published defaults ({entry.get('note', 'tune=defaults')})")
    for name, info in results.get("detectors", {}).items():
        if "selected_block_name" in info:
            lines.append(f"{name}: NormRatio selected block {info['selected_block']} ({info['selected_block_name']}) "
                         f"of {len(info.get('ratios', []))}")
    for name, reason in results["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    timing = results.get("timing")
    if timing:
        lines.append(f"wall time: detector fitting {timing['fit_s']:.1f} s, tuning {timing['tuning_s']:.1f} s, "
                     f"test pass and report data {timing['test_s']:.1f} s")
    return "\n".join(lines)


def write_report(results: dict[str, Any], per_set: Sequence[dict[str, Tensor]], set_names: Sequence[str],
                 detector_names: Sequence[str], kept: Sequence[int], output_dir: str, plots: bool = True,
                 loggers: Sequence[Any] = ()) -> None:
    """Print the report and write results.json, results.csv, PNGs; log to W&B if present.

    Rank 0 only: nothing here (or below) may call a collective."""
    os.makedirs(output_dir, exist_ok=True)
    print("\n" + summary_text(results) + "\n")
    atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=2))
    rows = [[det, s, *(values.get(m, "") for m in METRICS)]
            for det, sets in results["metrics"].items() for s, values in sets.items()]
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["detector", "ood_set", *METRICS])
    writer.writerows(rows)
    atomic_write_text(os.path.join(output_dir, "results.csv"), table.getvalue())
    images = plot_scores(per_set, set_names, detector_names, kept, output_dir) if plots else {}
    print(f"results written to {os.path.abspath(output_dir)}")
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            log_to_wandb(logger.experiment, results, rows, images)


def plot_scores(per_set: Sequence[dict[str, Tensor]], set_names: Sequence[str], detector_names: Sequence[str],
                kept: Sequence[int], output_dir: str) -> dict[str, str]:
    """Score histograms (ID vs each OOD set) and ROC curves, one PNG each per detector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    plot_dir = os.path.join(output_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    for i in kept:
        name = detector_names[i]
        fig = score_figure(name, [data["scores"][:, i] for data in per_set], set_names)
        path = os.path.join(plot_dir, f"{name}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths[name] = path
    return paths


def score_figure(name: str, scores: Sequence[Tensor], set_names: Sequence[str]) -> Any:
    """One detector's figure: histograms (left) and ROC curves with OOD positive (right);
    ``scores[0]`` is the ID set. Each set keeps one colour in both panels."""
    import matplotlib.pyplot as plt

    from lightning_ood.evaluation.metrics import roc_curve_ood

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_hist, ax_roc) = plt.subplots(1, 2, figsize=(10, 4))
    positions, xlabel = histogram_axis(scores)
    pooled = torch.cat(positions)
    edges = torch.linspace(float(pooled.min()), float(pooled.max()) + 1e-12, 51)
    for k, (set_name, values) in enumerate(zip(set_names, positions)):
        colour = colours[k % len(colours)]
        label = f"{set_name} (ID)" if k == 0 else set_name
        ax_hist.hist(values.numpy(), bins=edges.numpy(), alpha=0.5, density=True, color=colour, label=label)
        if k > 0:
            fpr, tpr = roc_curve_ood(scores[0], scores[k])
            ax_roc.plot(fpr.numpy(), tpr.numpy(), color=colour, label=set_name)
    ax_hist.set(title=f"{name}: scores (higher = ID)", xlabel=xlabel, ylabel="density")
    ax_roc.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax_roc.set(title=f"{name}: ROC (OOD positive)", xlabel="FPR (ID flagged OOD)", ylabel="TPR (OOD detected)")
    ax_hist.legend(fontsize=8)
    ax_roc.legend(fontsize=8)
    fig.tight_layout()
    return fig


def histogram_axis(scores: Sequence[Tensor], crowded: float = 0.5) -> tuple[list[Tensor], str]:
    """Where each score goes on the histogram's x-axis, and the axis label.

    The raw score on a linear axis clipped to the pooled 0.5-99.5 % quantiles, unless one
    of 50 equal bins would then hold more than ``crowded`` of all samples (a saturated score
    such as MSP near 1, or a heavy tail): then the pooled rank (the fraction of all plotted
    samples with a lower score), which spreads any monotone score evenly and keeps the
    ID/OOD overlap visible."""
    scores = [s.detach().double().cpu() for s in scores]
    pooled = torch.cat(scores)
    low, high = torch.quantile(pooled, torch.tensor([0.005, 0.995], dtype=torch.float64)).tolist()
    if high > low:
        clipped = [s.clamp(low, high) for s in scores]
        counts = torch.histc(torch.cat(clipped), bins=50, min=low, max=high)
        if float(counts.max()) <= crowded * len(pooled):
            return clipped, "score (clipped to the 0.5-99.5 % quantiles)"
    ordered = torch.sort(pooled).values
    ranks = [(torch.searchsorted(ordered, s, right=False).double() + torch.searchsorted(ordered, s, right=True))
             / (2 * len(ordered)) for s in scores]
    return ranks, "score rank (fraction of all samples scoring lower)"


def log_to_wandb(run: Any, results: dict[str, Any], rows: list[list[Any]], images: dict[str, str]) -> None:
    """Summary metrics, a metrics table and the plots, on the W&B run."""
    import wandb

    run.summary["ood/id_accuracy"] = results["id"]["accuracy"]
    for det, sets in results["metrics"].items():
        for s, values in sets.items():
            for metric, value in values.items():
                run.summary[f"ood/{det}/{s}/{metric}"] = value
    table = wandb.Table(columns=["detector", "ood_set", *METRICS], data=[[*r[:2], *(v if v != "" else None for v in r[2:])] for r in rows])
    payload: dict[str, Any] = {"ood/results": table}
    payload.update({f"ood/plots/{name}": wandb.Image(path) for name, path in images.items()})
    run.log(payload)
