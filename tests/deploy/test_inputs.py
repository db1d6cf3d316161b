"""Deploy-time inputs: unreadable model files, the export CLI's output, raw images for
``preprocess`` and batches for ``model(x)``. Tiny untrained models (width 8, 16 px)."""
from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

import lightning_ood
from lightning_ood.detectors import build_detector
from lightning_ood.deploy import CheckpointError, OODModel, export_program, load, load_program, save_with_detectors
from lightning_ood.deploy.__main__ import main
from lightning_ood.lightning.module import OODClassifier

MEAN, STD = [0.5, 0.25, 0.125], [0.25, 0.5, 2.0]
PREPROCESSING = {"image_size": 16, "mean": MEAN, "std": STD}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model file (MSP + Energy, which need no fitting) and its .pt2 program."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("inputs")
    model = OODClassifier(width=8, num_classes=3).eval()
    for name in ("msp", "energy"):
        detector = build_detector(name)
        detector.attach(model.head, model.backbone.num_blocks)
        model.detectors[detector.name] = detector
    ckpt = save_with_detectors(model, root / "model.ckpt", preprocessing=PREPROCESSING, thresholds={"msp": 0.5})
    export_program(ckpt, root / "model.pt2", verbose=False)
    return root


class _Payload:
    """Unpickling this would create ``marker``: loading must never run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------- unreadable files (item 9)
def _zip_of_notes(path, marker):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")


UNREADABLE = {
    # pickles of objects, whatever the protocol (0-3 are rejected by torch as "unsupported GLOBAL")
    "object_pickle_protocol_0": (lambda p, m: p.write_bytes(pickle.dumps(_Payload(m), protocol=0)),
                                 r"is a plain Python pickle of Python objects \(it references (io|builtins)\.open\); "
                                 r"nothing in it was loaded or run"),
    "object_pickle_protocol_5": (lambda p, m: p.write_bytes(pickle.dumps(_Payload(m), protocol=5)),
                                 r"is a plain Python pickle of Python objects \(it references (io|builtins)\.open\); "
                                 r"nothing in it was loaded or run"),
    "ordered_dict_pickle": (lambda p, m: p.write_bytes(pickle.dumps(OrderedDict(a=1), protocol=2)),
                            r"plain Python pickle of Python objects \(it references collections\.OrderedDict\)"),
    "plain_values_pickle": (lambda p, m: p.write_bytes(pickle.dumps([1, {"a": 2.0}], protocol=2)),
                            r"is a plain Python pickle; nothing in it was loaded or run. It is not a lightning_ood "
                            r"model file, which is a PyTorch zip archive"),
    "torch_zip_of_objects": (lambda p, m: torch.save({"payload": _Payload(m)}, p),
                             r"holds pickled Python objects .*it references (io|builtins)\.open, which was not "
                             r"loaded or run"),
    "random_bytes": (lambda p, m: p.write_bytes(np.random.default_rng(1).bytes(2048)),
                     r"\(2048 bytes\) is not a model file: its bytes are neither a PyTorch zip archive nor a pickle"),
    "text": (lambda p, m: p.write_text("hello world\n"),
             r"is not a model file: its bytes are neither a PyTorch zip archive nor a pickle"),
    "empty": (lambda p, m: p.write_bytes(b""), r"\(0 bytes\) is empty\. Copy the file again or re-create it"),
    "zip_not_torch": (_zip_of_notes, r"is not a model file: a zip archive, but not a PyTorch file \(it holds "
                                     r"'notes\.txt'\)\. Make one with lightning_ood\.deploy\.save_with_detectors"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_files_are_named_never_run_and_never_advise_weights_only_false(tmp_path, case):
    make, message = UNREADABLE[case]
    marker = tmp_path / "code_ran"
    path = tmp_path / "model.ckpt"
    make(path, str(marker))
    with pytest.raises(CheckpointError, match=message) as caught:
        lightning_ood.load(path)
    text = str(caught.value)
    assert "weights_only=false" not in text.lower() and "weights_only" not in text
    assert "Could this error message be improved" not in text  # torch's boilerplate is not quoted
    assert not marker.exists()
    assert isinstance(caught.value, ValueError)


def test_loading_a_program_says_to_use_load_program(files):
    with pytest.raises(CheckpointError, match=r"model\.pt2 is a torch\.export program \(\.pt2\), not a lightning_ood "
                                              r"model file: load it with lightning_ood\.deploy\.load_program"):
        load(files / "model.pt2")


def test_a_legacy_torch_file_cut_short_is_called_truncated(tmp_path):
    torch.save({"weight": torch.zeros(4)}, tmp_path / "full.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupted: a PyTorch file of the legacy"):
        load(tmp_path / "cut.pt")


# --------------------------------------------------------------------------- the export CLI's output (item 6)
def test_export_cli_refuses_its_input_under_any_name(files, tmp_path, monkeypatch, capsys):
    source = tmp_path / "model.ckpt"
    source.write_bytes((files / "model.ckpt").read_bytes())
    before = source.read_bytes()
    (tmp_path / "link.ckpt").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    for out in ("./model.ckpt", str(tmp_path / "link.ckpt"), "../" + tmp_path.name + "/model.ckpt"):
        for extra in ([], ["--overwrite"]):  # --overwrite never allows writing over the input
            assert main([str(source), "--out", out, *extra]) == 1
            err = capsys.readouterr().err
            assert f"error: --out {out} is the input model file itself; choose another name" in err
    assert source.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["link.ckpt", "model.ckpt"]


def test_export_cli_refuses_a_folder_and_a_foreign_file_without_overwrite(files, tmp_path, capsys):
    source = str(files / "model.ckpt")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "kept.txt").write_text("kept")
    for extra in ([], ["--overwrite"]):
        assert main([source, "--out", str(folder), *extra]) == 1
        assert f"--out {folder} is a folder; name the .pt2 file to write" in capsys.readouterr().err
    assert os.listdir(folder) == ["kept.txt"]
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, weights)
    before = weights.read_bytes()
    assert main([source, "--out", str(weights)]) == 1
    err = capsys.readouterr().err
    assert f"error: {weights} exists and is not a torch.export program; pass --overwrite to replace it" in err
    assert weights.read_bytes() == before
    program = tmp_path / "model.pt2"
    program.write_bytes((files / "model.pt2").read_bytes())
    assert main([source, "--out", str(program)]) == 0  # an existing program may be replaced
    assert main([source, "--out", str(weights), "--overwrite"]) == 0
    module, metadata = load_program(weights)
    assert metadata["detectors"] == ["msp", "energy"]


# --------------------------------------------------------------------------- preprocess (item 8)
def _normalised(value: float, channel: int) -> float:
    return (value - MEAN[channel]) / STD[channel]


def _gradient(dtype) -> np.ndarray:
    """16x16 grey image: row 0 = 0, row 1 = full scale, row 2 = 13107 (0.2 of 65535), rest 32768."""
    values = np.full((16, 16), 32768, dtype=dtype)
    values[0], values[1], values[2] = 0, 65535, 13107
    return values


@pytest.mark.parametrize("make", ["I;16", "I;16B", "I", "uint16_tensor"])
def test_preprocess_scales_16_bit_images_by_their_range(files, make):
    from PIL import Image

    model = load(files / "model.ckpt")
    if make == "uint16_tensor":
        image = torch.from_numpy(_gradient(np.int32)).to(torch.uint16)[None]
    else:
        dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[make]
        image = Image.fromarray(_gradient(dtype))
        assert image.mode == make
    batch = model.preprocess(image)  # 16 px: resize and crop keep every pixel
    assert batch.shape == (1, 3, 16, 16)
    for c in range(3):  # hand-computed: (value / 65535 - mean) / std
        assert batch[0, c, 0].tolist() == pytest.approx([_normalised(0.0, c)] * 16, abs=1e-6)
        assert batch[0, c, 1].tolist() == pytest.approx([_normalised(1.0, c)] * 16, abs=1e-6)
        assert batch[0, c, 2].tolist() == pytest.approx([_normalised(0.2, c)] * 16, abs=1e-6)
        assert batch[0, c, 3:].flatten().tolist() == pytest.approx([_normalised(32768 / 65535, c)] * 208, abs=1e-6)
    # not saturated: only row 1 is at full scale
    assert (batch[0, 0] == batch[0, 0].max()).float().mean().item() == pytest.approx(1 / 16)


def test_preprocess_takes_float_images_in_0_1_and_refuses_unknown_ranges(files):
    from PIL import Image

    model = load(files / "model.ckpt")
    values = np.tile(np.linspace(0.0, 1.0, 16, dtype=np.float32), (16, 1))
    batch = model.preprocess(Image.fromarray(values))
    for c in range(3):
        assert batch[0, c, 5].tolist() == pytest.approx([_normalised(float(v), c) for v in values[5]], abs=1e-6)
    with pytest.raises(ValueError, match=r"'F'\) PIL image must hold values in \[0, 1\]; got \[0, 255\]"):
        model.preprocess(Image.fromarray(values * 255))
    with pytest.raises(ValueError, match=r"'I' PIL image holds values in \[-5, 0\], outside the 16-bit range"):
        model.preprocess(Image.fromarray(np.pad(np.full((1, 1), -5, dtype=np.int32), ((0, 15), (0, 15)))))
    for dtype in (torch.int16, torch.int32, torch.int64):
        with pytest.raises(TypeError, match=rf"uint8, uint16 or float tensors; got {dtype}"):
            model.preprocess(torch.zeros(1, 16, 16, dtype=dtype))


# --------------------------------------------------------------------------- model(x) (item 10)
def test_model_takes_a_preprocessed_batch_and_refuses_a_pil_image(files):
    from PIL import Image

    model = load(files / "model.ckpt")
    image = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"takes a normalised float tensor \(B, C, H, W\), got Image; "
                                        r"call model\(model\.preprocess\(images\)\)"):
        model(image)
    with torch.no_grad():
        out = model(model.preprocess([image, image]))
    assert out["logits"].shape == (2, 3) and set(out["scores"]) == {"msp", "energy"}
    assert torch.isfinite(out["scores"]["energy"]).all()


@pytest.mark.parametrize("x, message", [
    (torch.zeros(2, 3, 1, 1), r"takes 16x16 images \(the stored crop size\), got 1x1"),
    (torch.zeros(2, 3, 32, 32), r"takes 16x16 images \(the stored crop size\), got 32x32"),
    (torch.zeros(2, 4, 16, 16), r"takes 3-channel images, got 4"),
    (torch.zeros(0, 3, 16, 16), r"non-empty batch"),
])
def test_model_checks_shapes_against_the_stored_preprocessing(files, x, message):
    model = load(files / "model.ckpt")
    with pytest.raises(ValueError, match=message) as caught:
        model(x)
    assert "model.preprocess(images)" in str(caught.value)


def test_the_input_check_reads_no_values_and_leaves_export_working(files, tmp_path):
    model = load(files / "model.ckpt")
    model._check_input(torch.empty(2, 3, 16, 16, device="meta"))  # shapes and dtypes only: no value is read
    with pytest.raises(TypeError, match="got torch.float64"):
        model._check_input(torch.empty(2, 3, 16, 16, dtype=torch.float64, device="meta"))
    # without stored preprocessing only dtype and rank are checked
    bare = OODModel(model.classifier)
    with torch.no_grad():
        assert bare(torch.zeros(1, 3, 20, 20))["logits"].shape == (1, 3)
    result = export_program(model, tmp_path / "again.pt2", example_batch=3, verbose=False)
    assert result["exported"] == ["msp", "energy"] and max(result["max_abs_diff"].values()) < 1e-5
    program, _ = load_program(tmp_path / "again.pt2")
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected, got = model(x), program(x)
    torch.testing.assert_close(got["logits"], expected["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["scores"]["energy"], expected["scores"]["energy"], atol=1e-5, rtol=0)
