"""Model files with built-in detectors: save, load in a fresh process, torch.export, bad files."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import lightning_ood
from lightning_ood.deploy import load as deploy_load
from lightning_ood.lightning.callback import OODEvaluation
from lightning_ood.data import DigitsDataModule, OODSet
from lightning_ood.data.digits import load_digit_images
from lightning_ood.detectors import Detector, FitData, WeiPer, build_detector
from lightning_ood.deploy import (
    CHECKPOINT_NAME, FORMAT, FORMAT_VERSION, CheckpointError, OODModel, export_program, load, load_program,
    save_with_detectors,
)
from lightning_ood.deploy.__main__ import main
from lightning_ood.lightning.artifacts import log_artifact
from lightning_ood.lightning.module import OODClassifier

DETECTORS = ["msp", "energy", "ash_s", "weiper", "feature_norm"]

# A fresh interpreter: first the export CLI exactly as `python -m lightning_ood.deploy CKPT
# --out PT2` runs it, then lightning_ood.load of the same file on the saved inputs.
FRESH_PROCESS = textwrap.dedent("""
    import runpy, sys
    ckpt, inputs, outputs, program = sys.argv[1:5]
    sys.argv = ["lightning_ood.deploy", ckpt, "--out", program]
    try:
        runpy.run_module("lightning_ood.deploy", run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None), f"export CLI exited with {done.code}"
    import torch, lightning_ood
    model = lightning_ood.load(ckpt)
    with torch.inference_mode():
        out = model(torch.load(inputs))
    torch.save({"logits": out["logits"], "scores": out["scores"], "is_ood": out["is_ood"],
                "training": model.training, "thresholds": model.thresholds}, outputs)
""")


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _reference(pl_module: OODClassifier, x: torch.Tensor) -> dict:
    """The in-memory model's outputs: one forward pass + every attached detector."""
    with torch.inference_mode():
        outputs = pl_module.forward_outputs(x, with_block_norms=True)
        return {"logits": outputs.logits, "scores": {n: d(outputs) for n, d in pl_module.detectors.items()}}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Train a few steps on the digits, evaluate with OODEvaluation (which writes the model
    file), and keep a Lightning checkpoint of the same model for the bad-file tests."""
    pl.seed_everything(0)
    root = tmp_path_factory.mktemp("evaluated")
    # small test sets keep the evaluation pass short: ~80 ID test images, ~180 near-OOD (digit 9)
    dm = DigitsDataModule(id_classes=range(9), test_fraction=0.05, batch_size=32,
                          ood_sets=[OODSet("digits_heldout", "near")])
    model = OODClassifier(width=8, num_classes=dm.num_classes)
    # tune="defaults": tuning is covered by its own tests; tuned values reaching the file is
    # covered by test_every_detector_round_trips (non-default ASH/WeiPer settings)
    callback = OODEvaluation(detectors=DETECTORS, fit_samples=64, plots=False, output_dir=str(root / "report"),
                             tune="defaults")
    trainer = _trainer(max_steps=3, limit_val_batches=0, callbacks=[callback], default_root_dir=str(root))
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    lightning_ckpt = str(root / "lightning.ckpt")
    trainer.save_checkpoint(lightning_ckpt)
    model.eval()
    id_images = next(iter(dm.test_dataloader()[0]))[0][:7]
    ood_images = next(iter(dm.test_dataloader()[1]))[0][:5]
    return SimpleNamespace(root=root, dm=dm, model=model, callback=callback, lightning_ckpt=lightning_ckpt,
                           ckpt=str(root / "report" / CHECKPOINT_NAME), x=torch.cat([id_images, ood_images]))


def _assert_outputs_close(got: dict, ref: dict, atol: float) -> None:
    torch.testing.assert_close(got["logits"], ref["logits"], atol=atol, rtol=0)
    assert set(got["scores"]) == set(ref["scores"])
    for name in ref["scores"]:
        torch.testing.assert_close(got["scores"][name], ref["scores"][name], atol=atol, rtol=0, msg=name)


# --------------------------------------------------------------------------- end to end
def test_evaluation_writes_a_safe_file_that_loads_identically_in_a_fresh_process(evaluated, tmp_path):
    callback, ckpt = evaluated.callback, evaluated.ckpt
    assert callback.checkpoint_path == ckpt and os.path.isfile(ckpt)
    assert [f for f in os.listdir(os.path.dirname(ckpt)) if f.endswith(".tmp")] == []

    raw = torch.load(ckpt, weights_only=True)  # tensors and plain values only
    assert raw["format"] == FORMAT and raw["format_version"] == FORMAT_VERSION
    assert raw["model"]["hparams"]["width"] == 8 and raw["model"]["hparams"]["num_classes"] == 9
    classes = {d["name"]: d["class"] for d in raw["detectors"]}
    assert classes == {"msp": "MSP", "energy": "Energy", "ash_s": "ASH", "weiper": "WeiPer", "feature_norm": "FeatureNorm"}
    weiper_args = next(d["init_args"] for d in raw["detectors"] if d["name"] == "weiper")
    assert weiper_args["weight"] is None and weiper_args["bias"] is None
    # W~ is re-drawn at load from the saved head and seed, checked against its digest
    assert "detectors.weiper.perturbed_weight" not in raw["state_dict"]
    assert "detectors.weiper.train_hist_wz" in raw["state_dict"]
    regenerated = next(d["regenerated"] for d in raw["detectors"] if d["name"] == "weiper")
    assert set(regenerated) == {"perturbed_weight", "perturbed_bias"}
    assert raw["preprocessing"]["mean"] == pytest.approx(list(evaluated.dm.mean))
    assert raw["preprocessing"]["crop_size"] == 32
    assert raw["thresholds"] == callback.results["thresholds"] and set(raw["thresholds"]) == set(classes)

    inputs, outputs, program = tmp_path / "x.pt", tmp_path / "out.pt", tmp_path / "model.pt2"
    torch.save(evaluated.x, inputs)
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, ckpt, str(inputs), str(outputs), str(program)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported detectors: msp, energy, ash_s, weiper, feature_norm" in done.stdout
    got = torch.load(outputs, weights_only=True)
    reference = _reference(evaluated.model, evaluated.x)
    _assert_outputs_close(got, reference, atol=1e-6)
    assert got["training"] is False
    for name, threshold in raw["thresholds"].items():
        assert torch.equal(got["is_ood"][name], got["scores"][name] < threshold)

    # the .pt2 written by the CLI: same results for two batch sizes (the batch is dynamic)
    module, metadata = load_program(program)
    assert metadata["detectors"] == list(classes) and metadata["not_exported"] == {}
    assert metadata["preprocessing"] == raw["preprocessing"]
    for n in (5, 12):
        x = evaluated.x[:n]
        exported = module(x)
        _assert_outputs_close(exported, _reference(evaluated.model, x), atol=1e-5)
        for name, threshold in raw["thresholds"].items():
            assert torch.equal(exported["is_ood"][name], exported["scores"][name] < threshold)


def test_thresholds_flag_at_most_five_percent_of_the_id_test_set(evaluated):
    model = lightning_ood.load(evaluated.ckpt)
    flagged = {name: [] for name in model.thresholds}
    with torch.inference_mode():
        for images, _, _ in evaluated.dm.test_dataloader()[0]:
            out = model(images)
            for name in flagged:
                flagged[name].append(out["is_ood"][name])
    for name, chunks in flagged.items():
        rate = torch.cat(chunks).float().mean().item()
        assert rate <= 0.05 + 1e-9, (name, rate)


def test_preprocess_applies_the_id_test_transform(evaluated):
    model = load(evaluated.ckpt)
    raw, _ = load_digit_images(32)
    expected = evaluated.dm.test_transform()(raw[:4])
    torch.testing.assert_close(model.preprocess(raw[:4]), expected, atol=1e-6, rtol=0)
    as_uint8 = (raw[:2] * 255).round().to(torch.uint8)
    torch.testing.assert_close(model.preprocess(as_uint8), model.preprocess(as_uint8.float() / 255), atol=1e-6, rtol=0)
    from PIL import Image

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    batch = model.preprocess([photo, Image.fromarray(np.zeros((40, 40), dtype=np.uint8))])
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    assert model(batch)["logits"].shape == (2, 9)
    with pytest.raises(ValueError, match="already-normalised"):
        model.preprocess(expected)


# --------------------------------------------------------------------------- bad files
def _rewrite(evaluated, path, change) -> None:
    raw = torch.load(evaluated.ckpt, weights_only=True)
    change(raw)
    torch.save(raw, path)


def _drop_key(raw):
    del raw["state_dict"]["backbone.layer1.0.conv1.weight"]


BAD_FILES = {
    "missing": (None, FileNotFoundError, "not found"),
    "truncated": (lambda e, p: p.write_bytes(open(e.ckpt, "rb").read()[: os.path.getsize(e.ckpt) // 2]),
                  CheckpointError, "truncated or corrupted"),
    "random_bytes": (lambda e, p: p.write_bytes(np.random.default_rng(0).bytes(4096)), CheckpointError,
                     "not a model file: its bytes are neither a PyTorch zip archive nor a pickle"),
    "plain_state_dict": (lambda e, p: torch.save(e.model.state_dict(), p), CheckpointError,
                         "plain state_dict .*save_with_detectors"),
    "lightning_checkpoint": (lambda e, p: p.write_bytes(open(e.lightning_ckpt, "rb").read()), CheckpointError,
                             "PyTorch Lightning training checkpoint.*load_from_checkpoint"),
    "future_version": (lambda e, p: _rewrite(e, p, lambda r: r.update(format_version=FORMAT_VERSION + 1)),
                       CheckpointError, "newer lightning_ood.*[Uu]pgrade lightning_ood"),
    "wrong_num_classes": (lambda e, p: _rewrite(e, p, lambda r: r["model"]["hparams"].update(num_classes=4)),
                          CheckpointError, r"do not fit the recorded architecture.*head\.weight: file \(9, 64\) vs model \(4, 64\)"),
    "missing_weight": (lambda e, p: _rewrite(e, p, _drop_key), CheckpointError,
                       r"missing keys: \['backbone\.layer1\.0\.conv1\.weight'\]"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_give_clear_errors(evaluated, tmp_path, case):
    make, error, message = BAD_FILES[case]
    path = tmp_path / "model.ckpt"
    if make is not None:
        make(evaluated, path)
    with pytest.raises(error, match=message):
        lightning_ood.load(path)
    if error is CheckpointError:
        assert issubclass(error, ValueError)


@pytest.mark.parametrize("failure", ["save_raises", "replace_raises", "interrupted"])
def test_interrupted_save_keeps_the_previous_file(evaluated, tmp_path, monkeypatch, failure):
    path = tmp_path / "model.ckpt"
    save_with_detectors(evaluated.model, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(before[: len(before) // 2])
        raise (KeyboardInterrupt() if failure == "interrupted" else OSError("disk full"))

    if failure == "replace_raises":
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    else:
        monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises((OSError, KeyboardInterrupt)):
        save_with_detectors(evaluated.model, path, thresholds={"msp": 0.5})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.ckpt"]
    assert load(path).thresholds == {}


# --------------------------------------------------------------------------- units
class _DataDependent(Detector):
    """A user detector whose score branches on a tensor value: not exportable."""

    name = "data_dependent"

    def score(self, outputs):
        k = 2 if float(outputs.logits.max()) > 0 else 1
        return outputs.logits.topk(k, dim=1).values.sum(1)


def _fitted_classifier(loss: str, names: list[str]) -> OODClassifier:
    torch.manual_seed(0)
    model = OODClassifier(width=8, num_classes=3, loss=loss).eval()
    for name in names:
        if name == "weiper":  # settings a tuning run could have chosen, not the defaults
            detector = WeiPer(n_repeats=7, delta=2.4, lambda1=0.1, lambda2=1.0, smoothing=40, seed=3)
        else:
            detector = build_detector(name)
        if name == "ash_b":
            detector.percentile = 70.0
        detector.attach(model.head, model.backbone.num_blocks)
        model.detectors[detector.name] = detector
    with torch.no_grad():  # 16 px images: the CIFAR-stem ResNet takes any size, and it is fast
        x = torch.randn(12, 3, 16, 16)
        plain = model.forward_outputs(x, with_block_norms=True)
        shuffled = model.forward_outputs(x.flip(2), with_block_norms=True)
        for detector in model.detectors.values():
            if detector.requires_fit:
                detector.fit(FitData(plain.features, plain.block_norms, shuffled.block_norms))
    return model


@pytest.mark.parametrize("loss, names", [
    ("ce", ["max_logit", "penultimate_norm", "ash_p", "ash_b", "weiper", "feature_norm"]),
    ("isomax_plus", ["min_distance", "msp"]),
])
def test_every_detector_round_trips(tmp_path, loss, names):
    model = _fitted_classifier(loss, names)
    first = next(iter(model.detectors))
    path = save_with_detectors(model, tmp_path / "m.ckpt", thresholds={first: 0.0},
                               preprocessing={"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    loaded = load(path)
    assert not loaded.training and list(loaded.detectors) == list(model.detectors)
    for name, detector in model.detectors.items():
        assert loaded.detectors[name].extra_repr() == detector.extra_repr()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = loaded(x)
    _assert_outputs_close(out, _reference(model, x), atol=1e-6)
    assert set(out["is_ood"]) == set(loaded.thresholds)
    reloaded = load(save_with_detectors(loaded, tmp_path / "again.ckpt"))  # keeps thresholds, preprocessing
    assert reloaded.thresholds == loaded.thresholds and reloaded.preprocessing == loaded.preprocessing


def _weiper_file(tmp_path, **save_options):
    model = _fitted_classifier("ce", ["msp", "weiper"])
    return model, save_with_detectors(model, tmp_path / "m.ckpt", **save_options)


def test_weiper_perturbed_head_is_redrawn_at_load_not_stored(tmp_path):
    model, compact = _weiper_file(tmp_path)
    full = save_with_detectors(model, tmp_path / "full.ckpt", compact=False)
    raw, raw_full = torch.load(compact, weights_only=True), torch.load(full, weights_only=True)
    assert "detectors.weiper.perturbed_weight" not in raw["state_dict"]
    assert "detectors.weiper.perturbed_weight" in raw_full["state_dict"]
    weiper_entry = next(d for d in raw_full["detectors"] if d["name"] == "weiper")
    assert weiper_entry.get("regenerated", {}) == {}
    # (7 repeats x 3 classes x 64) float32 values fewer on disk
    saved = os.path.getsize(full) - os.path.getsize(compact)
    assert saved >= model.detectors["weiper"].perturbed_weight.numel() * 4
    x = torch.randn(4, 3, 16, 16)
    reference = _reference(model, x)
    for path in (compact, full):
        loaded = load(path)
        assert torch.equal(loaded.detectors["weiper"].perturbed_weight, model.detectors["weiper"].perturbed_weight)
        assert torch.equal(loaded.detectors["weiper"].perturbed_bias, model.detectors["weiper"].perturbed_bias)
        with torch.no_grad():
            _assert_outputs_close(loaded(x), reference, atol=0)


def test_perturbed_head_not_derivable_from_the_head_is_stored(tmp_path):
    model = _fitted_classifier("ce", ["weiper"])
    with torch.no_grad():
        model.head.weight.add_(0.5)  # the head changed after W~ was drawn from it
    path = save_with_detectors(model, tmp_path / "m.ckpt")
    assert "detectors.weiper.perturbed_weight" in torch.load(path, weights_only=True)["state_dict"]
    loaded = load(path)
    assert torch.equal(loaded.detectors["weiper"].perturbed_weight, model.detectors["weiper"].perturbed_weight)


def test_a_redrawn_perturbed_head_that_differs_is_a_clear_error(tmp_path, monkeypatch):
    """Stands in for a torch whose random generator changed: the re-drawn W~ is off by one
    float32 step, and load refuses instead of giving different scores."""
    from lightning_ood.detectors import weiper as weiper_module

    _, path = _weiper_file(tmp_path)
    raw = torch.load(path, weights_only=True)
    raw["torch_version"] = "2.0.0"  # written by another torch
    torch.save(raw, tmp_path / "older_torch.ckpt")
    real_draw = weiper_module.draw_perturbed_head

    def drifted(*args, **kwargs):
        weight, bias = real_draw(*args, **kwargs)
        return torch.nextafter(weight, torch.full_like(weight, float("inf"))), bias

    monkeypatch.setattr(weiper_module, "draw_perturbed_head", drifted)
    with pytest.raises(CheckpointError, match=r"weiper.*perturbed_weight re-drawn .* differs.*torch 2\.0\.0; "
                                              r"this is torch .*compact=False"):
        load(tmp_path / "older_torch.ckpt")
    with pytest.raises(CheckpointError, match=r"does not match its recorded digest.*edited or damaged"):
        load(path)  # same torch version: the file, not the generator, is to blame


@pytest.mark.parametrize("damage", ["list", "digest_and_tensor"])
def test_damaged_regenerated_entries_are_clear_errors(tmp_path, damage):
    model, path = _weiper_file(tmp_path)
    raw = torch.load(path, weights_only=True)
    entry = next(d for d in raw["detectors"] if d["name"] == "weiper")
    if damage == "list":
        entry["regenerated"] = ["perturbed_weight"]
    else:  # the tensor is in the file although the entry says it was left out
        raw["state_dict"]["detectors.weiper.perturbed_weight"] = model.detectors["weiper"].perturbed_weight
    torch.save(raw, tmp_path / "damaged.ckpt")
    with pytest.raises(CheckpointError, match="weiper.*damaged 'regenerated' entry"):
        load(tmp_path / "damaged.ckpt")


def test_a_perturbed_head_of_another_dtype_is_stored_not_left_out(tmp_path):
    model = _fitted_classifier("ce", ["weiper"]).double()  # W~ cast after it was drawn
    path = save_with_detectors(model, tmp_path / "m.ckpt")
    raw = torch.load(path, weights_only=True)
    assert raw["state_dict"]["detectors.weiper.perturbed_weight"].dtype == torch.float64
    assert next(d for d in raw["detectors"] if d["name"] == "weiper")["regenerated"] == {}
    loaded = load(path)  # a float32 model, the stored W~ cast to it
    assert loaded.detectors["weiper"].perturbed_weight.dtype == torch.float32
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(loaded(x)["scores"]["weiper"]).all()


def test_format_version_1_files_still_load(tmp_path):
    model, _ = _weiper_file(tmp_path)
    path = save_with_detectors(model, tmp_path / "v2_full.ckpt", compact=False)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 1  # version 1: every buffer stored, no "regenerated" entries
    for entry in raw["detectors"]:
        entry.pop("regenerated", None)
    torch.save(raw, tmp_path / "v1.ckpt")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        _assert_outputs_close(load(tmp_path / "v1.ckpt")(x), _reference(model, x), atol=0)


def test_custom_detectors_are_refused_by_files_and_left_out_of_programs(tmp_path, capsys):
    model = _fitted_classifier("ce", ["msp", "ash_s"])
    model.detectors["data_dependent"] = _DataDependent()
    with pytest.raises(CheckpointError, match="_DataDependent.*only hold the detectors of lightning_ood.detectors"):
        save_with_detectors(model, tmp_path / "m.ckpt")
    assert os.listdir(tmp_path) == []
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    wrapped = OODModel(model, thresholds={"ash_s": 1.0}, preprocessing={"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    result = export_program(wrapped, tmp_path / "m.pt2", example_batch=3)
    assert result["exported"] == ["msp", "ash_s"]
    assert "data-dependent" in result["not_exported"]["data_dependent"]
    assert "NOT exported: data_dependent" in capsys.readouterr().out
    # the program, run on the example batch, against the eager model (load_program: e2e test)
    assert set(result["max_abs_diff"]) == {"logits", "msp", "ash_s"} and max(result["max_abs_diff"].values()) < 1e-5
    assert os.path.isfile(tmp_path / "m.pt2")
    # export leaves every train/eval mode and requires_grad flag as it was
    assert [m.training for m in model.modules()] == modes and [p.requires_grad for p in model.parameters()] == grads


def test_cli_reports_missing_and_foreign_files(tmp_path, capsys):
    assert main([str(tmp_path / "nope.ckpt")]) == 1
    assert "error: model file not found" in capsys.readouterr().err
    torch.save({"weight": torch.zeros(2)}, tmp_path / "sd.pt")
    assert main([str(tmp_path / "sd.pt"), "--out", str(tmp_path / "x.pt2")]) == 1
    assert "plain state_dict" in capsys.readouterr().err
    assert not (tmp_path / "x.pt2").exists()


def test_wandb_artifact_holds_the_file(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"model")
    logged = []
    run = SimpleNamespace(id="abc123", log_artifact=lambda artifact, aliases: logged.append((artifact, aliases)))
    log_artifact(run, str(path), {"detectors": ["msp"]})
    (artifact, aliases), = logged
    assert artifact.type == "model" and artifact.name == "model-with-detectors-abc123" and aliases == ["latest"]
    assert CHECKPOINT_NAME in artifact.manifest.entries and artifact.metadata["detectors"] == ["msp"]


def test_load_is_exposed_on_the_package():
    assert lightning_ood.load.__doc__ and deploy_load is not lightning_ood.load


class _Payload:
    """Unpickling this would create ``marker``: the file loaders must never run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind, message", [
    ("plain_pickle", r"is a plain Python pickle of Python objects \(it references (io|builtins)\.open\); nothing in "
                     r"it was loaded or run. It is not a lightning_ood model file"),
    ("torch_zip", r"holds pickled Python objects .*it references (io|builtins)\.open, which was not loaded or run"),
    ("empty", r"\(0 bytes\) is empty"),
])
def test_pickles_and_empty_files_are_named_and_never_run(tmp_path, kind, message):
    import pickle

    marker = str(tmp_path / "code_ran")
    path = tmp_path / "model.ckpt"
    if kind == "plain_pickle":
        path.write_bytes(pickle.dumps(_Payload(marker)))
    elif kind == "torch_zip":
        torch.save({"format": "x", "payload": _Payload(marker)}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=message) as caught:
        lightning_ood.load(str(path))
    assert "weights_only" not in str(caught.value)  # never the advice that would run the file's code
    assert not os.path.exists(marker)


def test_export_cli_never_writes_over_its_input_or_a_foreign_file(tmp_path, evaluated, capsys):
    from lightning_ood.deploy.__main__ import main as export_main

    source = tmp_path / "model.ckpt"
    source.write_bytes(open(evaluated.ckpt, "rb").read())
    before = source.read_bytes()
    link = tmp_path / "link.ckpt"
    os.link(source, link)  # the same inode under another name
    for out in (source, link):
        assert export_main([str(source), "--out", str(out)]) == 1
        assert "is the input model file itself" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert export_main([str(source), "--out", str(notes)]) == 1
    assert "exists and is not a torch.export program; pass --overwrite" in capsys.readouterr().err
    assert source.read_bytes() == before and notes.read_text() == "keep me"
    program = tmp_path / "model.pt2"
    assert export_main([str(source), "--out", str(program)]) == 0
    assert export_main([str(source), "--out", str(program)]) == 0  # an earlier program may be replaced
    assert export_main([str(source), "--out", str(notes), "--overwrite"]) == 0
    assert source.read_bytes() == before


def test_preprocess_scales_16_bit_and_float_images_by_their_range(evaluated):
    from PIL import Image

    model = load(evaluated.ckpt)
    spec = model.preprocessing
    mean, std = torch.tensor(spec["mean"])[:, None, None], torch.tensor(spec["std"])[:, None, None]
    # a constant 32x32 16-bit grey image (the crop size: resizing keeps a constant) of 13107 = 0.2 * 65535
    grey16 = Image.fromarray(np.full((32, 32), 13107, dtype=np.uint16))
    assert grey16.mode.startswith("I")
    expected = ((torch.full((3, 32, 32), 0.2) - mean) / std)[None]
    torch.testing.assert_close(model.preprocess(grey16), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.preprocess(torch.full((1, 32, 32), 13107, dtype=torch.uint16)), expected,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(model.preprocess(Image.fromarray(np.full((32, 32), 0.2, dtype=np.float32))), expected,
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"'F'\) PIL image must hold values in \[0, 1\]; got \[0, 7\]"):
        model.preprocess(Image.fromarray(np.linspace(0, 7, 1024, dtype=np.float32).reshape(32, 32)))
    with pytest.raises(ValueError, match=r"outside the 16-bit range"):
        model.preprocess(Image.fromarray(np.full((32, 32), 70000, dtype=np.int32)))


@pytest.mark.parametrize("x, error, message", [
    (torch.zeros(2, 3, 1, 1), ValueError, r"takes 32x32 images \(the stored crop size\), got 1x1"),
    (torch.zeros(2, 1, 32, 32), ValueError, r"takes 3-channel images, got 1"),
    (torch.zeros(0, 3, 32, 32), ValueError, r"non-empty batch"),
    (torch.zeros(3, 32, 32), ValueError, r"non-empty batch \(B, C, H, W\), got shape \(3, 32, 32\)"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, r"normalised torch.float32 batch, got torch.uint8"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.float64), TypeError, r"got torch.float64"),
    ("image.png", TypeError, r"got str"),
])
def test_calling_the_model_checks_its_input_and_names_preprocess(evaluated, x, error, message):
    model = load(evaluated.ckpt)
    with pytest.raises(error, match=message) as caught:
        model(x)
    assert "model.preprocess(images)" in str(caught.value)


def test_model_files_record_the_network_arguments_and_ignore_only_training_ones():
    """A served network is rebuilt from the Classifier arguments; every other argument an
    (older) file may record is one of OODClassifier's training-only ones, so load never drops
    something that shapes the network."""
    import inspect

    from lightning_ood.deploy.load import TRAINING_ONLY_ARGUMENTS
    from lightning_ood.nn.classifier import NETWORK_ARGUMENTS, Classifier

    network = list(inspect.signature(Classifier.__init__).parameters)[1:]
    training = list(inspect.signature(OODClassifier.__init__).parameters)[1:]
    assert tuple(network) == NETWORK_ARGUMENTS
    assert set(training) == set(NETWORK_ARGUMENTS) | set(TRAINING_ONLY_ARGUMENTS)
    assert not set(NETWORK_ARGUMENTS) & set(TRAINING_ONLY_ARGUMENTS)
    assert set(Classifier("resnet18", "ce", 3, width=4).config) == set(NETWORK_ARGUMENTS)
