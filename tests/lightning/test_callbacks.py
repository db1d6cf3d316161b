"""OODEvaluation: 1 process == 2 processes, one forward pass per test batch, de-duplication
of padded samples, fail-fast input checks."""
import json
import math

import pytest
import pytorch_lightning as pl
import torch

from lightning_ood.lightning.callback import OODEvaluation
from lightning_ood.data.base import OODSet
from lightning_ood.detectors import detector_names
from tests.ddp_eval_script import (DETECTORS, SIZES, PaddedRandomOODDataModule, RandomOODDataModule, SampleCounter,
                                   make_model, run_evaluation)

BATCH = 4  # RandomOODDataModule's default batch size


class CountBackboneCalls(pl.Callback):
    """Counts calls of ``pl_module.backbone`` (a forward pre-hook): those made before the
    first test batch (the detectors' fit pass) and those made during each test batch."""

    def __init__(self) -> None:
        self.calls = 0
        self.before_test_batches = None
        self.per_batch: list[tuple[int, int]] = []  # (dataloader_idx, calls)

    def setup(self, trainer, pl_module, stage):
        pl_module.backbone.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.before_test_batches is None:
            self.before_test_batches = self.calls
        self._start = self.calls

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.per_batch.append((dataloader_idx, self.calls - self._start))


def _read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One set of model weights for every run of this module."""
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(make_model().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, weights):
    out = tmp_path_factory.mktemp("one_process")
    counter = CountBackboneCalls()
    trainer, callback = run_evaluation(str(out), weights=weights, callbacks=[counter])
    return {"results": _read(out / "results.json"), "callback": callback, "counter": counter,
            "metrics": dict(trainer.callback_metrics)}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, weights):
    """The same evaluation on 2 CPU processes (Gloo). Only files and callback_metrics come
    back from ddp_spawn."""
    out = tmp_path_factory.mktemp("two_processes")
    trainer, _ = run_evaluation(str(out), devices=2, strategy="ddp_spawn", weights=weights)
    return {"results": _read(out / "results.json"), "metrics": dict(trainer.callback_metrics)}


# ------------------------------------------------------------------ 1 vs 2 processes
def test_two_processes_give_the_results_of_one(one_process, two_processes):
    one, two = one_process["results"], two_processes["results"]
    assert (one["devices"], two["devices"]) == (1, 2)
    # every sample counted once (the padded sampler's duplicates: test below)
    for results in (one, two):
        assert results["id"]["n"] == SIZES["test"] == 23
        assert {s: v["n"] for s, v in results["ood"].items()} == {"near_noise": 17, "far_blobs": 11}
        assert {s: v["group"] for s, v in results["ood"].items()} == {"near_noise": "near", "far_blobs": "far"}
    assert set(one["metrics"]) == {"msp", "energy", "ash_s", "weiper", "feature_norm"}
    assert set(two["metrics"]) == set(one["metrics"]) and one["skipped"] == two["skipped"] == {}
    for detector, sets in one["metrics"].items():
        assert set(sets) == {"near_noise", "far_blobs", "near", "far"}
        for set_name, values in sets.items():
            for metric, value in values.items():
                assert two["metrics"][detector][set_name][metric] == pytest.approx(value, abs=1e-6), \
                    (detector, set_name, metric)
    assert two["id"]["accuracy"] == pytest.approx(one["id"]["accuracy"], abs=1e-6)
    assert two["id"]["accuracy_by_detector"] == pytest.approx(one["id"]["accuracy_by_detector"], abs=1e-6)
    assert two["thresholds"] == pytest.approx(one["thresholds"], abs=1e-5)
    # the fitted detectors saw every training image exactly once, on 1 or 2 ranks
    for results in (one, two):
        assert results["detectors"]["weiper"]["n_train"] == SIZES["train"]
        assert results["detectors"]["feature_norm"]["num_fit_images"] == SIZES["train"]
    assert two["detectors"]["feature_norm"]["selected_block"] == one["detectors"]["feature_norm"]["selected_block"]
    assert two["detectors"]["feature_norm"]["ratios"] == pytest.approx(one["detectors"]["feature_norm"]["ratios"], rel=1e-5)
    # the run is not degenerate: detectors disagree, so equal numbers are not a coincidence
    aurocs = {d: one["metrics"][d]["near_noise"]["auroc"] for d in one["metrics"]}
    assert len({round(a, 6) for a in aurocs.values()}) > 2, aurocs


@pytest.mark.timeout(300)
def test_padded_sampler_duplicates_are_dropped_end_to_end(tmp_path, one_process, weights):
    """Lightning's default DistributedSampler pads every odd-sized set with repeated samples;
    the gathered results must still equal one process exactly."""
    trainer, _ = run_evaluation(str(tmp_path), devices=2, strategy="ddp_spawn", weights=weights,
                                datamodule=PaddedRandomOODDataModule(), callbacks=[SampleCounter(str(tmp_path))])
    seen = [_read(tmp_path / f"samples_rank{r}.json") for r in (0, 1)]
    # 2 ranks x ceil(n / 2): one duplicate per set really reached the callback
    assert [a + b for a, b in zip(*seen)] == [24, 18, 12]
    one, two = one_process["results"], _read(tmp_path / "results.json")
    assert two["id"]["n"] == 23 and {s: v["n"] for s, v in two["ood"].items()} == {"near_noise": 17, "far_blobs": 11}
    for detector, sets in one["metrics"].items():
        for set_name, values in sets.items():
            assert two["metrics"][detector][set_name] == pytest.approx(values, abs=1e-6), (detector, set_name)
    assert two["id"]["accuracy"] == pytest.approx(one["id"]["accuracy"], abs=1e-6)
    assert two["id"]["accuracy_by_detector"] == pytest.approx(one["id"]["accuracy_by_detector"], abs=1e-6)
    assert two["thresholds"] == pytest.approx(one["thresholds"], abs=1e-6)
    for detector, info in one["detectors"].items():
        assert {k: v for k, v in two["detectors"][detector].items() if k != "ratios"} == \
            {k: v for k, v in info.items() if k != "ratios"}, detector
        assert two["detectors"][detector].get("ratios") == pytest.approx(info.get("ratios"), rel=1e-6), detector


def test_logged_test_accuracy_ignores_ddp_padding(one_process, two_processes):
    assert float(one_process["metrics"]["test/acc"]) == pytest.approx(one_process["results"]["id"]["accuracy"])
    assert float(two_processes["metrics"]["test/acc"]) == pytest.approx(two_processes["results"]["id"]["accuracy"])


# ------------------------------------------------------------- one forward pass
def test_each_test_batch_runs_the_backbone_exactly_once(one_process):
    counter = one_process["counter"]
    expected_batches = [math.ceil(SIZES[s] / BATCH) for s in ("test", "near_noise", "far_blobs")]
    assert [sum(1 for i, _ in counter.per_batch if i == k) for k in range(3)] == expected_batches
    assert [calls for _, calls in counter.per_batch] == [1] * sum(expected_batches)
    # the fit pass is separate: every training image once, plus its jigsaw version for
    # FeatureNorm's block selection
    assert counter.before_test_batches == 2 * math.ceil(SIZES["train"] / BATCH)


def test_detectors_without_statistics_need_no_fit_pass(tmp_path):
    counter = CountBackboneCalls()
    _, callback = run_evaluation(str(tmp_path), detectors=["msp", "max_logit", "ash_b"], callbacks=[counter])
    assert counter.before_test_batches == 0
    assert [calls for _, calls in counter.per_batch] == [1] * 14
    assert set(callback.results["metrics"]) == {"msp", "max_logit", "ash_b"}


def test_default_detectors_of_an_isomax_plus_model(tmp_path):
    """No detectors configured: the defaults plus the loss's native score; WeiPer (which
    perturbs a linear head) is skipped with its reason, not crashed."""
    _, callback = run_evaluation(str(tmp_path), loss="isomax_plus", detectors=None)
    results = _read(tmp_path / "results.json")
    assert "min_distance" in results["metrics"]
    assert {"msp", "max_logit", "energy", "ash_p", "ash_b", "ash_s", "feature_norm"} <= set(results["metrics"])
    assert "weiper" not in results["metrics"] and "linear head" in results["skipped"]["weiper"]
    # min_distance = -|d| * (Euclidean distance from the unit feature to the nearest unit
    # prototype), computed here by hand from the pooled features and the head's parameters
    from lightning_ood.evaluation.metrics import ood_metrics
    from tests.ddp_eval_script import make_model

    model = make_model("isomax_plus").eval()
    datamodule = RandomOODDataModule()
    datamodule.setup("test")

    def hand_scores(dataset):
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        with torch.no_grad():
            features = model.backbone(images).double()
        unit_features = features / features.norm(dim=1, keepdim=True)
        prototypes = model.head.prototypes.detach().double()
        unit_prototypes = prototypes / prototypes.norm(dim=1, keepdim=True)
        distances = ((unit_features[:, None, :] - unit_prototypes[None]) ** 2).sum(-1).sqrt()
        return -model.head.distance_scale.detach().double().abs() * distances.min(dim=1).values

    id_scores = hand_scores(datamodule.test_set)
    for name, dataset in datamodule.ood_test_sets.items():
        expected = ood_metrics(id_scores, hand_scores(dataset))["auroc"]
        assert results["metrics"]["min_distance"][name]["auroc"] == pytest.approx(expected, abs=1e-6), name


# ----------------------------------------------------------------- FPR95 convention
def test_fpr95_positive_switches_convention_only_for_fpr95(tmp_path, one_process, weights):
    _, callback = run_evaluation(str(tmp_path), weights=weights, detectors=["msp", "energy", "ash_s"],
                                 fpr95_positive="id")
    by_id, by_ood = callback.results, one_process["results"]
    assert by_id["fpr95_positive"] == "id" and by_ood["fpr95_positive"] == "ood"
    changed = 0
    for detector in ("msp", "energy", "ash_s"):
        for set_name in ("near_noise", "far_blobs"):
            a, b = by_id["metrics"][detector][set_name], by_ood["metrics"][detector][set_name]
            for metric in ("auroc", "aupr_in", "aupr_out"):
                assert a[metric] == pytest.approx(b[metric], abs=1e-9)
            changed += a["fpr95"] != pytest.approx(b["fpr95"], abs=1e-9)
    assert changed > 0


# ------------------------------------------------------------------ fail fast
class _NoForward(pl.Callback):
    """Fails the test if the model runs at all."""

    def setup(self, trainer, pl_module, stage):
        def fail(module, args):
            raise AssertionError("the model ran before the bad input was reported")

        pl_module.backbone.register_forward_pre_hook(fail)


def _run_bad(tmp_path, datamodule=None, detectors=DETECTORS, **options):
    return run_evaluation(str(tmp_path / "out"), detectors=detectors, callbacks=[_NoForward()],
                          datamodule=datamodule, **options)


def test_missing_ood_folder_fails_before_compute(tmp_path):
    missing = tmp_path / "no_such_folder"
    datamodule = RandomOODDataModule(ood_sets=[OODSet("near_noise", "near"), OODSet("x", path=str(missing))])
    with pytest.raises(FileNotFoundError, match=r"OOD folder not found: .*no_such_folder \(OOD set 'x'\): "
                       r"point its `path` at a folder of images or remove the set from the config"):
        _run_bad(tmp_path, datamodule)
    assert not (tmp_path / "out" / "results.json").exists()


class _CountTrainingSteps(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


@pytest.mark.parametrize("bad", ["ood_set", "ood_val_set"])
def test_missing_ood_folder_fails_before_training(tmp_path, bad):
    """With the callback on the trainer, ``fit`` (train.py runs the test stage after it)
    checks the OOD sets before the first training step, not after the last epoch."""
    from tests.ddp_eval_script import make_callback, trainer_kwargs

    missing = OODSet("x", "far", path=str(tmp_path / "no_such_folder"))
    if bad == "ood_set":
        datamodule, options = RandomOODDataModule(ood_sets=[OODSet("near_noise", "near"), missing]), {}
    else:
        datamodule, options = RandomOODDataModule(), dict(tune="ood_val", ood_val_sets=[missing])
    steps = _CountTrainingSteps()
    trainer = pl.Trainer(**trainer_kwargs(max_epochs=1, callbacks=[make_callback(**options), steps]))
    with pytest.raises(FileNotFoundError, match="OOD folder not found: .*no_such_folder"):
        trainer.fit(make_model(), datamodule=datamodule)
    assert steps.steps == 0


def test_fit_without_a_datamodule_or_with_unused_ood_val_sets_still_trains(tmp_path):
    from torch.utils.data import DataLoader

    from tests.ddp_eval_script import make_callback, trainer_kwargs

    unused = [OODSet("x", "far", path=str(tmp_path / "no_such_folder"))]  # only read by tune="ood_val"
    steps = _CountTrainingSteps()
    trainer = pl.Trainer(**trainer_kwargs(max_steps=1, callbacks=[make_callback(ood_val_sets=unused), steps]))
    trainer.fit(make_model(), datamodule=RandomOODDataModule())
    assert steps.steps == 1
    datamodule = RandomOODDataModule()
    datamodule.setup("fit")
    steps = _CountTrainingSteps()
    trainer = pl.Trainer(**trainer_kwargs(max_steps=1, callbacks=[make_callback(), steps]))
    with pytest.warns(UserWarning, match="OODEvaluation runs in trainer.test with an OODDataModule"):
        trainer.fit(make_model(), train_dataloaders=DataLoader(datamodule.train_set, batch_size=4))
    assert steps.steps == 1


def test_empty_ood_folder_fails_before_compute(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    datamodule = RandomOODDataModule(ood_sets=[OODSet("x", path=str(empty))])
    with pytest.raises(FileNotFoundError, match="holds no images"):
        _run_bad(tmp_path, datamodule)


def test_ood_folder_of_images_is_evaluated(tmp_path):
    from tests.helpers import write_random_images

    write_random_images(tmp_path / "textures" / "nested", 5, seed=0, size=(20, 24))
    datamodule = RandomOODDataModule(ood_sets=[OODSet("textures", "far", path=str(tmp_path / "textures"))])
    _, callback = run_evaluation(str(tmp_path / "out"), detectors=["msp", "energy"], datamodule=datamodule)
    assert callback.results["ood"] == {"textures": {"n": 5, "group": "far"}}
    assert set(callback.results["metrics"]["msp"]) == {"textures", "far"}


def test_unknown_detector_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown detector 'mahalanobis_typo'") as err:
        OODEvaluation(detectors=["msp", "mahalanobis_typo"])
    for name in detector_names():
        assert name in str(err.value)


def test_bad_options_fail_early(tmp_path):
    with pytest.raises(ValueError, match="fpr95_positive"):
        OODEvaluation(fpr95_positive="both")
    with pytest.raises(TypeError, match="Detector instances"):
        OODEvaluation(detectors=[42])
    with pytest.raises(ValueError, match="detector 'msp' is configured twice"):
        _run_bad(tmp_path, detectors=["msp", "MSP"])


@pytest.mark.parametrize("detector", ["weiper", "feature_norm"])
def test_detector_needing_training_statistics_without_training_set(tmp_path, detector):
    datamodule = RandomOODDataModule(with_fit_set=False)
    with pytest.raises(ValueError, match="need ID training statistics.*no training set"):
        _run_bad(tmp_path, datamodule, detectors=["msp", detector])


def test_datamodule_without_ood_sets_fails(tmp_path):
    with pytest.raises(ValueError, match="declares no OOD sets"):
        _run_bad(tmp_path, RandomOODDataModule(ood_sets=[]))


@pytest.mark.parametrize("loss", ["ce", "isomax_plus"])
def test_bf16_mixed_precision_evaluation_matches_float32(tmp_path, loss):
    """Under bf16-mixed the backbone returns bfloat16 features; the detectors (fitted, tuned
    and scored in float32) must work on them and give nearly the float32 metrics. This
    untrained model's scores are nearly tied, so bf16 rounding alone moves a metric by up to
    0.13 (measured); the bound catches a broken half-precision path, not rounding."""
    from tests.ddp_eval_script import make_callback, trainer_kwargs

    results = {}
    for precision in ("32-true", "bf16-mixed"):
        callback = make_callback(detectors=None, output_dir=str(tmp_path / precision), tune="jigsaw")
        trainer = pl.Trainer(**trainer_kwargs(precision=precision, callbacks=[callback]))
        model = make_model(loss)
        trainer.test(model, datamodule=RandomOODDataModule())
        for name, detector in model.detectors.items():
            for buffer_name, buffer in detector.named_buffers():
                assert not buffer.is_floating_point() or buffer.dtype == torch.float32, (name, buffer_name)
        results[precision] = callback.results
    full, mixed = results["32-true"], results["bf16-mixed"]
    assert set(mixed["metrics"]) == set(full["metrics"]) and mixed["skipped"] == full["skipped"]
    assert "min_distance" in full["metrics"] if loss == "isomax_plus" else "weiper" in full["metrics"]
    for detector, per_set in full["metrics"].items():
        for set_name, metrics in per_set.items():
            for metric, value in metrics.items():
                assert math.isfinite(mixed["metrics"][detector][set_name][metric])
                assert mixed["metrics"][detector][set_name][metric] == pytest.approx(value, abs=0.2), (detector, set_name, metric)
    assert mixed["id"]["accuracy"] == pytest.approx(full["id"]["accuracy"], abs=0.1)
    # exact: MSP and Energy from the model run by hand under the same bfloat16 autocast
    def run_by_hand(model, images):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(images)

    assert_msp_and_energy_match_a_hand_run(mixed["metrics"], make_model(loss).eval(), run_by_hand)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
@pytest.mark.parametrize("loss", ["ce", "isomax_plus"])
def test_whole_model_precisions_evaluate(tmp_path, precision, loss):
    """Lightning converts model and inputs to the precision; the fit and tuning passes do
    the same, and every detector scores (ASH re-computes logits in the head's dtype)."""
    from tests.ddp_eval_script import make_callback, trainer_kwargs

    callback = make_callback(detectors=None, output_dir=str(tmp_path), tune="jigsaw")
    pl.Trainer(**trainer_kwargs(precision=precision, callbacks=[callback])).test(
        make_model(loss), datamodule=RandomOODDataModule())
    expected = {"msp", "max_logit", "energy", "ash_p", "ash_b", "ash_s", "feature_norm"}
    expected |= {"min_distance"} if loss == "isomax_plus" else {"weiper"}
    assert set(callback.results["metrics"]) == expected
    for per_set in callback.results["metrics"].values():
        assert all(math.isfinite(v) for metrics in per_set.values() for v in metrics.values())
    # MSP and Energy from the model run by hand in that dtype (logits scored in float64)
    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16}[precision]
    assert_msp_and_energy_match_a_hand_run(callback.results["metrics"], make_model(loss).eval().to(dtype),
                                           lambda model, images: model(images.to(dtype)))


def assert_msp_and_energy_match_a_hand_run(metrics, model, run) -> None:
    """The MSP and Energy AUROCs of ``metrics`` equal those of ``run(model, images)`` on the
    whole RandomOODDataModule test sets, its logits scored in float64 here (to 1e-9)."""
    from lightning_ood.evaluation.metrics import ood_metrics

    datamodule = RandomOODDataModule()
    datamodule.setup("test")

    def logits_of(dataset):
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        with torch.no_grad():
            return run(model, images).double()

    id_logits = logits_of(datamodule.test_set)
    for name, dataset in datamodule.ood_test_sets.items():
        ood_logits = logits_of(dataset)
        for detector, score in (("msp", lambda z: z.softmax(1).max(1).values), ("energy", lambda z: z.logsumexp(1))):
            expected = ood_metrics(score(id_logits), score(ood_logits))["auroc"]
            assert metrics[detector][name]["auroc"] == pytest.approx(expected, abs=1e-9), (detector, name)


# ------------------------------------------------------------- jigsaw pseudo-OOD
def test_fit_and_tuning_really_see_jigsaw_images(tmp_path):
    """With the jigsaw replaced by the identity, NormRatio is exactly 1 for every block and
    every tuning AUROC 0.5: both must differ here."""
    _, callback = run_evaluation(str(tmp_path), detectors=["feature_norm", "ash_s"], tune="jigsaw")
    ratios = torch.tensor(callback.results["detectors"]["feature_norm"]["ratios"])
    assert (ratios - 1).abs().min() > 1e-3, ratios
    aurocs = [point["auroc"] for point in callback.results["tuning"]["ash_s"]["grid"]]
    assert any(abs(a - 0.5) > 0.05 for a in aurocs), aurocs


@pytest.mark.parametrize("spec", ["all", ["all"]])
def test_detectors_all_evaluates_every_registered_detector(tmp_path, spec):
    from lightning_ood.deploy import load
    from lightning_ood.detectors import detector_names
    from tests.ddp_eval_script import make_callback, make_model, trainer_kwargs

    callback = make_callback(detectors=spec, output_dir=str(tmp_path), save_checkpoint=True)
    datamodule = RandomOODDataModule(sizes={"train": 60})  # KNN's k = 50 needs 50 fit images
    pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(make_model("ce"), datamodule=datamodule)
    results = callback.results
    reported = set(results["detectors"]) | set(results["skipped"])
    assert reported == set(detector_names())
    assert set(results["skipped"]) <= {"min_distance", "ash_p", "ash_b", "ash_s", "scale"}  # no distance head / post-ReLU
    for name in results["detectors"]:
        assert all(0.0 <= m["auroc"] <= 1.0 for m in results["metrics"][name].values()), name
    assert set(load(callback.checkpoint_path).detectors) == set(results["detectors"])
