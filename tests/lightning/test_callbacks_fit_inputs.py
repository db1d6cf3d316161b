"""What OODEvaluation's fit, tuning and test passes really feed the model, and in which
precision: FeatureNorm's NormRatio and the jigsaw tuning see tile-permuted copies of the ID
images, seeded by the sample's index; under ``64-true`` every pass is float64, under bf16 every
pass is bf16 and the detectors score in float32. Every expectation is computed here by hand
(forward hooks, tile matching, float64 / float32 references), not with the code under test."""
from typing import Optional

import pytest
import pytorch_lightning as pl
import torch

from lightning_ood.evaluation import runner
from lightning_ood.lightning.callback import OODEvaluation
from tests.ddp_eval_script import RandomOODDataModule, make_callback, make_model, run_evaluation, trainer_kwargs

GRID = 3
TILE = RandomOODDataModule.image_size // GRID  # 5 px tiles of the 16 px images, a 1 px border
IDENTITY = list(range(GRID * GRID))


class ForwardRecorder(pl.Callback):
    """Records what ``pl_module.backbone`` is fed and returns (forward hooks, registered in
    ``setup``, before OODEvaluation's fit and tuning passes in ``on_test_start``).

    Attributes:
        before_test: every input batch of the passes before the first test batch (fit, tuning).
        dtypes: ``{"before_test" | "test": {(input dtype, features dtype), ...}}``.
        test: ``(indices, ForwardOutputs)`` of every ID test batch.
    """

    def __init__(self) -> None:
        self.before_test: list[torch.Tensor] = []
        self.dtypes: dict[str, set] = {"before_test": set(), "test": set()}
        self.test: list[tuple[torch.Tensor, object]] = []
        self._testing = False

    def setup(self, trainer, pl_module, stage):
        self._handles = [pl_module.backbone.register_forward_pre_hook(self._input),
                         pl_module.backbone.register_forward_hook(self._output)]

    def teardown(self, trainer, pl_module, stage):
        for handle in self._handles:
            handle.remove()

    def _input(self, module, args):
        if not self._testing:
            self.before_test.append(args[0].detach().clone())

    def _output(self, module, args, output):
        self.dtypes["test" if self._testing else "before_test"].add((args[0].dtype, output[0].dtype))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._testing = True

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if dataloader_idx == 0:
            self.test.append((batch[2].detach().clone(), outputs["outputs"]))


def hand_forward(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, logits and every block's FeatureNorm (docs/methods.md:
    ``(1/M) sum_m ||ReLU(z_m)||_2``), the block outputs read with forward hooks; the norms are
    accumulated in at least float32, as documented for half-precision maps."""
    maps = []
    handles = [block.register_forward_hook(lambda module, args, z: maps.append(z)) for block in model.backbone.blocks()]
    with torch.no_grad():
        features = model.backbone(images)
        logits = model.head(features)
    for handle in handles:
        handle.remove()
    norms = [z.to(torch.promote_types(z.dtype, torch.float32)).clamp(min=0).pow(2).sum(dim=(2, 3)).sqrt().mean(dim=1)
             for z in maps]
    return features, logits, torch.stack(norms, dim=1)


# ------------------------------------------------------ jigsaw in the fit and tuning passes
def _key(image: torch.Tensor) -> bytes:
    return image.float().numpy().tobytes()


def jigsaw_pairs(recorder: ForwardRecorder, datamodule: RandomOODDataModule) -> dict[tuple[str, int], tuple]:
    """``{(split, index): (image, what the backbone saw next to it)}`` for the fit (``fit``)
    and tuning (``val``) passes: a batch the datasets do not hold (in the dtype the backbone
    was fed) is paired, image by image, with the plain batch before it."""
    known = {}
    dtype = recorder.before_test[0].dtype if recorder.before_test else torch.float32
    for split, dataset in (("fit", datamodule.fit_set), ("val", datamodule.val_set)):
        for i in range(len(dataset)):
            known[_key(dataset[i][0].to(dtype))] = (split, i)
    pairs, previous = {}, None
    for batch in recorder.before_test:
        ids = [known.get(_key(image)) for image in batch]
        if all(ids):
            previous = (ids, batch)
            continue
        assert previous is not None and len(previous[1]) == len(batch), \
            "a batch of unknown images that does not follow its plain batch"
        for sample, plain, other in zip(previous[0], previous[1], batch):
            pairs[sample] = (plain, other)
        previous = None
    return pairs


def tile_permutation(plain: torch.Tensor, shuffled: torch.Tensor) -> Optional[list[int]]:
    """``perm`` with tile t of ``shuffled`` = tile ``perm[t]`` of ``plain`` (row-major 3x3
    grid), or ``None`` when ``shuffled``'s tiles are not a permutation of ``plain``'s."""
    def tiles(image):
        return [image[:, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] for r in range(GRID) for c in range(GRID)]

    sources, perm = tiles(plain), []
    for tile in tiles(shuffled):
        matches = [i for i, source in enumerate(sources) if torch.equal(source, tile)]
        if len(matches) != 1:
            return None
        perm.append(matches[0])
    return perm if sorted(perm) == IDENTITY else None


def check_jigsaw_inputs(pairs: dict, datamodule: RandomOODDataModule) -> None:
    """Every fit image (41) and tuning image (5) reached the backbone with a jigsaw version:
    its 3x3 tiles permuted (not in place), the 1 px border 0, the same multiset of pixel
    values inside the tiled area; the permutations differ between images."""
    expected = ({("fit", i) for i in range(len(datamodule.fit_set))}
                | {("val", i) for i in range(len(datamodule.val_set))})
    assert set(pairs) == expected, f"no jigsaw version of {sorted(expected - set(pairs))[:5]} ..."
    area = GRID * TILE
    perms = set()
    for sample, (plain, shuffled) in pairs.items():
        assert not torch.equal(shuffled, plain), f"the jigsaw of {sample} is the image itself"
        perm = tile_permutation(plain, shuffled)
        assert perm is not None and perm != IDENTITY, (sample, perm)
        assert (shuffled[:, area:, :] == 0).all() and (shuffled[:, :, area:] == 0).all(), sample
        assert torch.equal(plain[:, :area, :area].flatten().sort().values,
                           shuffled[:, :area, :area].flatten().sort().values), sample
        perms.add(tuple(perm))
    assert len(perms) > len(pairs) // 2, "the images share a few permutations: not drawn per image"


def check_norm_ratios(callback: OODEvaluation, pairs: dict) -> None:
    """FeatureNorm's NormRatios (docs/methods.md: mean over the fit images of
    ``f_n(x) / f_n(jigsaw(x))``) equal the ones computed here from the recorded images, and
    none is 1 (the identity jigsaw gives exactly 1 for every block)."""
    ratios = torch.tensor(callback.results["detectors"]["feature_norm"]["ratios"], dtype=torch.float64)
    assert (ratios - 1).abs().min() > 1e-3, ratios
    fit = sorted(sample for sample in pairs if sample[0] == "fit")
    model = make_model().eval()  # the weights run_evaluation tested (same seed)
    plain = hand_forward(model, torch.stack([pairs[s][0] for s in fit]))[2].double()
    shuffled = hand_forward(model, torch.stack([pairs[s][1] for s in fit]))[2].double()
    # float32 norms summed in another order, stored in a float32 buffer: 1e-5 relative
    torch.testing.assert_close(ratios, (plain / shuffled).mean(dim=0), rtol=1e-5, atol=0)


def _jigsaw_run(folder: str, batch_size: int) -> tuple[ForwardRecorder, RandomOODDataModule, OODEvaluation]:
    recorder, datamodule = ForwardRecorder(), RandomOODDataModule(batch_size=batch_size)
    _, callback = run_evaluation(folder, detectors=["feature_norm", "ash_s"], tune="jigsaw", callbacks=[recorder],
                                 datamodule=datamodule)
    return recorder, datamodule, callback


@pytest.fixture(scope="module")
def jigsaw_runs(tmp_path_factory):
    """The same evaluation with batches of 4 and of 3 images."""
    return {b: _jigsaw_run(str(tmp_path_factory.mktemp(f"batch{b}")), b) for b in (4, 3)}


def test_fit_and_tuning_passes_see_tile_permuted_images(jigsaw_runs):
    recorder, datamodule, _ = jigsaw_runs[4]
    check_jigsaw_inputs(jigsaw_pairs(recorder, datamodule), datamodule)


def test_jigsaw_depends_on_the_sample_index_only(jigsaw_runs):
    """Seeded per sample index: every image gets the same jigsaw in a second run with batches
    of 3 instead of 4 (a per-batch or per-position seed changes it)."""
    (rec4, dm4, _), (rec3, dm3, _) = jigsaw_runs[4], jigsaw_runs[3]
    pairs4, pairs3 = jigsaw_pairs(rec4, dm4), jigsaw_pairs(rec3, dm3)
    assert set(pairs4) == set(pairs3)
    for sample in pairs4:
        assert torch.equal(pairs4[sample][0], pairs3[sample][0]), sample
        assert torch.equal(pairs4[sample][1], pairs3[sample][1]), sample


def test_norm_ratios_are_the_jigsaw_ratios_and_differ_from_1(jigsaw_runs):
    recorder, datamodule, callback = jigsaw_runs[4]
    check_norm_ratios(callback, jigsaw_pairs(recorder, datamodule))


def test_jigsaw_is_the_same_under_every_precision(jigsaw_runs, tmp_path):
    """Seeded per sample index, whatever the precision: the fit images get the tile
    permutations of the 32-true run under 64-true and bf16-true too."""
    recorder, datamodule, _ = jigsaw_runs[4]
    pairs = jigsaw_pairs(recorder, datamodule)
    expected = {s: tile_permutation(*pairs[s]) for s in pairs if s[0] == "fit"}
    for precision in ("64-true", "bf16-true"):
        recorder, _, datamodule = _precision_run(str(tmp_path / precision), precision)
        pairs = jigsaw_pairs(recorder, datamodule)
        got = {s: tile_permutation(plain.float(), shuffled.float()) for s, (plain, shuffled) in pairs.items()
               if s[0] == "fit"}
        assert got == expected, (precision, sum(got[s] != expected[s] for s in expected), "of", len(expected))


def _identity(images, indices, seed):
    return images


def _seeded_by_position(images, indices, seed):
    """A broken jigsaw seeded by the position in the batch instead of the sample index."""
    return original_jigsaw(images, torch.arange(len(images)), seed)


original_jigsaw = runner.jigsaw_batch


def test_the_checks_catch_an_identity_jigsaw(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "jigsaw_batch", _identity)
        recorder, datamodule, callback = _jigsaw_run(str(tmp_path), 4)
    pairs = jigsaw_pairs(recorder, datamodule)
    assert pairs == {}
    with pytest.raises(AssertionError, match="no jigsaw version"):
        check_jigsaw_inputs(pairs, datamodule)
    with pytest.raises(AssertionError):
        check_norm_ratios(callback, pairs)


def test_the_checks_catch_a_jigsaw_seeded_by_batch_position(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "jigsaw_batch", _seeded_by_position)
        runs = {b: _jigsaw_run(str(tmp_path / str(b)), b) for b in (4, 3)}
    (rec4, dm4, _), (rec3, dm3, _) = runs[4], runs[3]
    pairs4, pairs3 = jigsaw_pairs(rec4, dm4), jigsaw_pairs(rec3, dm3)
    with pytest.raises(AssertionError):  # only 4 permutations for 46 images
        check_jigsaw_inputs(pairs4, dm4)
    assert any(not torch.equal(pairs4[s][1], pairs3[s][1]) for s in pairs4)


# ------------------------------------------------------------ whole-model precisions
DETECTORS = ["energy", "msp", "ash_s", "feature_norm"]


def _precision_run(folder: str, precision: str,
                   loss: str = "ce") -> tuple[ForwardRecorder, OODEvaluation, RandomOODDataModule]:
    recorder, datamodule = ForwardRecorder(), RandomOODDataModule()
    callback = make_callback(detectors=DETECTORS, output_dir=folder, tune="jigsaw")
    pl.Trainer(**trainer_kwargs(precision=precision, callbacks=[callback, recorder])).test(
        make_model(loss), datamodule=datamodule)
    return recorder, callback, datamodule


def _test_outputs(recorder: ForwardRecorder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ID test images (as the dataset holds them, float32) and the recorded features,
    logits and block norms, in the order of the test batches."""
    test_set = RandomOODDataModule().build()["test"]
    indices = torch.cat([i for i, _ in recorder.test])
    images = torch.stack([test_set[int(i)][0] for i in indices])
    outputs = [o for _, o in recorder.test]
    return (images, torch.cat([o.features for o in outputs]), torch.cat([o.logits for o in outputs]),
            torch.cat([o.block_norms for o in outputs]))


def _scores(callback: OODEvaluation, name: str) -> torch.Tensor:
    """The ID test scores the callback recorded for detector ``name``, in batch order."""
    column = list(callback._to_attach).index(name)
    return torch.cat(callback._collector._buffers[0]["scores"])[:, column]


def test_64_true_evaluation_matches_a_float64_hand_computation(tmp_path):
    """Fit, tuning and test passes run in float64 and the bundle keeps float64: features,
    logits and block norms equal a float64 computation to 1e-9 (a float32 step anywhere on
    the path would leave errors of about 1e-7). Scores and NormRatios are stored as float32:
    one rounding, at most 2^-24 relative."""
    recorder, callback, datamodule = _precision_run(str(tmp_path), "64-true")
    float64 = {(torch.float64, torch.float64)}
    assert recorder.dtypes == {"before_test": float64, "test": float64}
    images, features, logits, norms = _test_outputs(recorder)
    assert features.dtype == logits.dtype == norms.dtype == torch.float64
    reference = make_model().double().eval()
    hand_features, hand_logits, hand_norms = hand_forward(reference, images.double())
    for got, expected in ((features, hand_features), (logits, hand_logits), (norms, hand_norms)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    u32 = 2.0 ** -24
    torch.testing.assert_close(_scores(callback, "energy").double(), torch.logsumexp(hand_logits, 1), rtol=u32, atol=0)
    torch.testing.assert_close(_scores(callback, "msp").double(), torch.softmax(hand_logits, 1).amax(1),
                               rtol=u32, atol=0)
    # the fit pass: NormRatios of the float64 images it fed the backbone, computed in float64
    pairs = jigsaw_pairs(recorder, datamodule)
    fit = sorted(sample for sample in pairs if sample[0] == "fit")
    assert len(fit) == len(datamodule.fit_set) and all(pairs[s][0].dtype == torch.float64 for s in fit)
    plain = hand_forward(reference, torch.stack([pairs[s][0] for s in fit]))[2]
    shuffled = hand_forward(reference, torch.stack([pairs[s][1] for s in fit]))[2]
    ratios = torch.tensor(callback.results["detectors"]["feature_norm"]["ratios"], dtype=torch.float64)
    torch.testing.assert_close(ratios, (plain / shuffled).mean(dim=0), rtol=u32, atol=1e-12)


#: bf16 keeps 8 significant bits: unit roundoff u = 2^-8. Each of the ~20 layers of this
#: ResNet18 rounds its output to bf16, so the pooled features, block norms and logits are off
#: by a few u (measured: 2u for features, 4u for logits); 8u = 2^-5 bounds that with room
#: and is still far below what a wrong path (other weights, other inputs) gives.
BF16_VS_FLOAT32 = 8 * 2.0 ** -8
#: Two bf16 values that differ at all differ by >= 1 ulp >= 2^-8 relative: below that means
#: "the same bf16 computation" (IsoMax+ logits are float32 distances of those same features).
SAME_BF16 = 2.0 ** -10


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((got.double() - expected.double()).norm(dim=1) / expected.double().norm(dim=1)).max())


@pytest.mark.parametrize("loss", ["ce", "isomax_plus"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_evaluation_matches_hand_computations(tmp_path, precision, loss):
    """Every pass runs the backbone in bf16; the bundle is float32 and equals the same bf16
    computation done by hand; the detectors score in float32 (a bf16 score would be off by
    ~2^-8); and the result is within BF16_VS_FLOAT32 of a float32 reference."""
    recorder, callback, _ = _precision_run(str(tmp_path), precision, loss)
    expected_input = torch.float32 if precision == "bf16-mixed" else torch.bfloat16
    for phase in ("before_test", "test"):
        assert recorder.dtypes[phase] == {(expected_input, torch.bfloat16)}, (phase, recorder.dtypes)
    images, features, logits, norms = _test_outputs(recorder)
    assert features.dtype == logits.dtype == norms.dtype == torch.float32

    if precision == "bf16-mixed":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            same = hand_forward(make_model(loss).eval(), images)
    else:
        same = hand_forward(make_model(loss).to(torch.bfloat16).eval(), images.to(torch.bfloat16))
    torch.testing.assert_close(features, same[0].float(), rtol=SAME_BF16, atol=0)
    torch.testing.assert_close(logits, same[1].float(), rtol=SAME_BF16, atol=1e-6)
    torch.testing.assert_close(norms, same[2].float(), rtol=1e-5, atol=0)  # float32 sums, another order

    # float32 arithmetic on the float32 bundle
    torch.testing.assert_close(_scores(callback, "energy"), torch.logsumexp(logits, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_scores(callback, "msp"), torch.softmax(logits, 1).amax(1), rtol=1e-6, atol=1e-6)

    full = hand_forward(make_model(loss).eval(), images)
    for what, got, expected in (("features", features, full[0]), ("logits", logits, full[1]),
                                ("block norms", norms, full[2])):
        assert _relative_error(got, expected) < BF16_VS_FLOAT32, (what, _relative_error(got, expected))
