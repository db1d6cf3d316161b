"""The OOD report: results dict (hand-checked metrics, near/far means, FPR95 convention),
results.json/csv, plots and the W&B offline run."""
import csv
import glob
import json
import os

import pytest
import torch

from lightning_ood.evaluation.report import build_results, format_table, summary_text, write_report

# ID scores 10..29; OOD sets scored lower on the whole (higher score = ID)
ID_SCORES = torch.arange(10, 30).double()
OOD_SETS = {
    "near_a": torch.tensor([*range(0, 16), 15.5, 16, 17, 40]).double(),  # 20 samples
    "near_b": torch.arange(5, 25).double() + 0.25,  # heavy overlap with ID
    "far_c": torch.arange(-30, -19).double(),  # 11 samples, all below ID
}
GROUPS = {"near_a": "near", "near_b": "near", "far_c": "far"}


def pairwise_auroc(id_scores, ood_scores):
    """P(ID score > OOD score) + 1/2 P(tie), from all pairs."""
    diff = id_scores[:, None] - ood_scores[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def fpr_at_95(positive, negative):
    """Fraction of negatives scored >= the threshold keeping 95% of positives (higher =
    positive), the threshold being the highest one that does."""
    kept = torch.sort(positive, descending=True).values
    threshold = kept[int(torch.ceil(torch.tensor(0.95 * len(kept)))) - 1]
    return float((negative >= threshold).double().mean())


def _per_set(n_detectors=2):
    """ID set + the three OOD sets; detector 0 scores as above, detector 1 the negation."""
    def scores(s):
        return torch.stack([s, -s], 1)[:, :n_detectors].float()

    labels = torch.arange(20) % 4
    # column 0: the model, wrong on the first 5 samples (3 - label != label for 0..3);
    # column 1: detector 1's shaped logits, always wrong
    predictions = torch.stack([labels, (labels + 1) % 4], 1)
    predictions[:5, 0] = 3 - labels[:5]
    id_set = {"indices": torch.arange(20), "labels": labels, "scores": scores(ID_SCORES), "predictions": predictions}
    ood = [{"indices": torch.arange(len(s)), "labels": torch.full((len(s),), -1), "scores": scores(s)}
           for s in OOD_SETS.values()]
    return [id_set, *ood]


def _results(fpr95_positive="ood", kept=(0, 1), skipped=None):
    return build_results(
        id_name="toy", set_names=["toy", *OOD_SETS], groups=GROUPS, per_set=_per_set(),
        detector_names=["plain", "shaped"], kept=list(kept), changes_logits=[False, True],
        skipped=skipped or {}, detector_info={"plain": {"class": "A"}, "shaped": {"class": "B"}},
        fpr95_positive=fpr95_positive, devices=1,
    )


def test_per_set_metrics_match_a_hand_computation():
    results = _results()
    for name, ood in OOD_SETS.items():
        row = results["metrics"]["plain"][name]
        assert row["auroc"] == pytest.approx(pairwise_auroc(ID_SCORES, ood), abs=1e-6)
        # the negated detector ranks everything the other way round
        assert results["metrics"]["shaped"][name]["auroc"] == pytest.approx(1 - row["auroc"], abs=1e-6)
        # OOD positive (default): ID samples flagged OOD when 95% of OOD is caught
        assert row["fpr95"] == pytest.approx(fpr_at_95(-ood, -ID_SCORES), abs=1e-6)
    assert results["metrics"]["plain"]["far_c"]["auroc"] == pytest.approx(1.0, abs=1e-6)
    assert results["metrics"]["plain"]["far_c"]["fpr95"] == 0.0
    assert results["metrics"]["plain"]["far_c"]["aupr_in"] == pytest.approx(1.0)


def test_fpr95_positive_switches_the_convention():
    by_ood, by_id = _results("ood"), _results("id")
    assert (by_ood["fpr95_positive"], by_id["fpr95_positive"]) == ("ood", "id")
    # near_a by hand: OOD positive -> 19 of 20 OOD caught at score <= 17, which flags the
    # 8 ID scores 10..17; ID positive -> 19 of 20 ID kept at score >= 11, which accepts
    # the 9 OOD scores 11..17, 15.5 and 40
    assert by_ood["metrics"]["plain"]["near_a"]["fpr95"] == pytest.approx(8 / 20)
    assert by_id["metrics"]["plain"]["near_a"]["fpr95"] == pytest.approx(9 / 20)
    for name, ood in OOD_SETS.items():
        assert by_id["metrics"]["plain"][name]["fpr95"] == pytest.approx(fpr_at_95(ID_SCORES, ood), abs=1e-6)
        for metric in ("auroc", "aupr_in", "aupr_out"):
            assert by_id["metrics"]["plain"][name][metric] == by_ood["metrics"]["plain"][name][metric]
    assert "positive class = ID" in summary_text(by_id)
    assert "positive class = OOD" in summary_text(by_ood)


def test_near_and_far_rows_are_means_of_their_sets():
    results = _results()
    for detector, rows in results["metrics"].items():
        assert set(rows) == {"near_a", "near_b", "far_c", "near", "far"}
        for metric in ("auroc", "fpr95"):
            assert rows["near"][metric] == pytest.approx((rows["near_a"][metric] + rows["near_b"][metric]) / 2)
            assert rows["far"][metric] == pytest.approx(rows["far_c"][metric])
        assert set(rows["near"]) == set(rows["far"]) == {"auroc", "fpr95"}
    assert {s: v["group"] for s, v in results["ood"].items()} == GROUPS
    assert {s: v["n"] for s, v in results["ood"].items()} == {"near_a": 20, "near_b": 20, "far_c": 11}


def test_no_group_row_without_members():
    results = build_results(
        id_name="toy", set_names=["toy", "near_a"], groups={"near_a": "near"}, per_set=_per_set()[:2],
        detector_names=["plain", "shaped"], kept=[0], changes_logits=[False, False], skipped={},
        detector_info={"plain": {}, "shaped": {}}, fpr95_positive="ood", devices=2,
    )
    assert set(results["metrics"]) == {"plain"} and set(results["metrics"]["plain"]) == {"near_a", "near"}
    assert "far mean" not in format_table(results) and "near mean" in format_table(results)


def test_accuracy_and_skipped_detectors():
    results = _results()
    assert results["id"]["n"] == 20
    assert results["id"]["accuracy"] == pytest.approx(15 / 20)
    assert results["id"]["accuracy_by_detector"] == {"shaped": 0.0}
    # a detector left out (e.g. ASH on negative features) has no metrics, accuracy or info
    results = _results(kept=(0,), skipped={"shaped": "features can be negative"})
    assert set(results["metrics"]) == {"plain"} and results["id"]["accuracy_by_detector"] == {}
    assert set(results["detectors"]) == {"plain"}
    assert "skipped shaped: features can be negative" in summary_text(results)


def test_write_report_files(tmp_path, capsys):
    results = _results()
    write_report(results, _per_set(), ["toy", *OOD_SETS], ["plain", "shaped"], [0, 1], str(tmp_path), plots=True)
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps(results))
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5  # detectors x (3 sets + near + far)
    near_a = next(r for r in rows if r["detector"] == "plain" and r["ood_set"] == "near_a")
    assert float(near_a["auroc"]) == pytest.approx(results["metrics"]["plain"]["near_a"]["auroc"])
    near = next(r for r in rows if r["detector"] == "plain" and r["ood_set"] == "near")
    assert near["aupr_in"] == "" and float(near["fpr95"]) == pytest.approx(results["metrics"]["plain"]["near"]["fpr95"])
    assert sorted(os.listdir(tmp_path / "plots")) == ["plain.png", "shaped.png"]
    assert (tmp_path / "plots" / "plain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "near mean" in printed and "far mean" in printed


def test_wandb_offline_run_holds_table_and_images(tmp_path, monkeypatch):
    import pytorch_lightning as pl
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    from tests.ddp_eval_script import RandomOODDataModule, make_callback, make_model, trainer_kwargs

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), project="lightning_ood_test")
    callback = make_callback(detectors=["msp", "energy"], plots=True, output_dir=str(tmp_path / "out"))
    trainer = pl.Trainer(**trainer_kwargs(logger=logger, callbacks=[callback]))
    trainer.test(make_model(), datamodule=RandomOODDataModule())
    logger.experiment.finish()
    # finish() returns before the wandb-core service has flushed the run file; teardown waits for it
    wandb.teardown()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path)
    run = runs[0]
    tables = glob.glob(os.path.join(run, "files", "media", "table", "**", "*.table.json"), recursive=True)
    assert len(tables) == 1
    with open(tables[0]) as f:
        table = json.load(f)
    assert table["columns"] == ["detector", "ood_set", "auroc", "fpr95", "aupr_in", "aupr_out"]
    logged = {(row[0], row[1]): row[2] for row in table["data"]}
    assert set(logged) == {(d, s) for d in ("msp", "energy") for s in ("near_noise", "far_blobs", "near", "far")}
    for (detector, set_name), auroc in logged.items():
        assert auroc == pytest.approx(callback.results["metrics"][detector][set_name]["auroc"])
    images = glob.glob(os.path.join(run, "files", "media", "images", "**", "*.png"), recursive=True)
    assert len(images) == 2
    assert sorted(os.listdir(tmp_path / "out" / "plots")) == ["energy.png", "msp.png"]
    # scalars live only inside the binary run file; their key names are visible in its bytes
    (run_file,) = glob.glob(os.path.join(run, "run-*.wandb"))
    data = open(run_file, "rb").read()
    for key in (b"ood/id_accuracy", b"ood/msp/near_noise/auroc", b"ood/energy/far/fpr95", b"ood/plots/msp"):
        assert key in data, key


def test_each_set_has_one_colour_in_histogram_and_roc():
    from matplotlib.colors import to_rgb

    from lightning_ood.evaluation.report import score_figure

    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(40, generator=g) + 2, torch.randn(30, generator=g), torch.randn(20, generator=g) - 1]
    fig = score_figure("det", scores, ["id", "near", "far"])
    ax_hist, ax_roc = fig.axes
    handles, labels = ax_hist.get_legend_handles_labels()
    hist_colour = {label: to_rgb(handle.get_facecolor()) for handle, label in zip(handles, labels)}
    roc_colour = {line.get_label(): to_rgb(line.get_color()) for line in ax_roc.lines if line.get_label() in ("near", "far")}
    assert set(roc_colour) == {"near", "far"}
    for name in ("near", "far"):
        assert hist_colour[name] == roc_colour[name], name
    assert set(hist_colour) == {"id (ID)", "near", "far"} and len(set(hist_colour.values())) == 3


def test_histogram_axis_spreads_saturated_and_heavy_tailed_scores():
    from lightning_ood.evaluation.report import histogram_axis

    # MSP-like: every ID score within 1e-4 of 1.0, OOD spread over [0.5, 1]
    id_scores = 1 - torch.linspace(0, 1e-4, 50)
    ood_scores = torch.linspace(0.5, 1.0, 50)
    positions, label = histogram_axis([id_scores, ood_scores])
    assert label.startswith("score rank")
    # pooled mid-ranks: the 100 values are distinct except 1.0 (in both sets)
    assert float(positions[0].max()) == pytest.approx(0.99) and float(positions[1].min()) == pytest.approx(0.005)
    # a heavy tail (one score 1e5, the rest O(1)) on a linear axis would put nearly all mass in one bin
    heavy = torch.cat([torch.linspace(0, 1, 99), torch.tensor([1e5])])
    assert histogram_axis([heavy, torch.linspace(0, 1, 100)])[1].startswith("score rank")
    # well-spread scores keep the raw (clipped) axis: values unchanged inside the 0.5-99.5 % quantiles
    spread = [torch.linspace(0, 10, 201), torch.linspace(-5, 5, 201)]
    positions, label = histogram_axis(spread)
    assert label.startswith("score (clipped")
    low, high = torch.quantile(torch.cat(spread).double(), torch.tensor([0.005, 0.995], dtype=torch.float64)).tolist()
    assert torch.equal(positions[0], spread[0].double().clamp(low, high))


def test_summary_says_as_configured_and_gives_the_wall_times():
    results = _results()
    results["tuning"] = {"ash_s": {"mode": "defaults", "values": "configured"},
                         "weiper": {"mode": "defaults", "values": "published"}}
    results["timing"] = {"fit_s": 1.25, "tuning_s": 0.5, "test_s": 3.0}
    text = summary_text(results)
    assert "ash_s: as configured (tune=defaults)" in text
    assert "weiper: published defaults (tune=defaults)" in text
    assert "wall time: detector fitting 1.2 s, tuning 0.5 s, test pass and report data 3.0 s" in text


def test_report_files_are_replaced_atomically(tmp_path, monkeypatch):
    """A crash while writing (here: the disk fails at fsync) leaves the previous results intact."""
    import lightning_ood.io

    results = _results()
    (tmp_path / "results.json").write_text('{"previous": true}')

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(lightning_ood.io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_report(results, _per_set(), ["toy", *OOD_SETS], ["plain", "shaped"], [0, 1], str(tmp_path), plots=False)
    assert json.loads((tmp_path / "results.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left behind
