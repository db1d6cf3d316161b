"""Datamodules: seeded splits, (image, label, index) samples, OOD sets, fit subsets, errors."""
import os

import pytest
import torch

import lightning_ood.data.base as data_base
from lightning_ood.data import (
    OOD_LABEL, CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, ImageFolderDataModule, OODSet,
    class_balanced_subset, known_ood_sets,
)
from lightning_ood.data.digits import load_digit_images, photo_patches
from lightning_ood.data.ood import ImageFiles
from tests.helpers import write_random_images


# ----------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(id_classes=(2, 5, 7), batch_size=64, val_size=50, seed=3)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def original_index():
    """Raw image bytes -> (index, label) in scikit-learn's digits (all 1797 images are distinct)."""
    images, labels = load_digit_images()
    return {images[i].numpy().tobytes(): (i, int(labels[i])) for i in range(len(images))}


def _raw(dataset):
    """The un-transformed tensors behind an IndexedDataset over a TensorDataset."""
    return dataset.dataset.tensors


def test_digits_labels_remapped_and_splits_disjoint(digits, original_index):
    assert digits.num_classes == 3
    seen = {}
    for split in ("train_set", "val_set", "test_set"):
        images, labels = _raw(getattr(digits, split))
        assert set(labels.tolist()) == {0, 1, 2}
        origin = [original_index[img.numpy().tobytes()] for img in images]
        # remapped label k is the k-th ID digit
        assert all((2, 5, 7)[label] == digit for label, (_, digit) in zip(labels.tolist(), origin))
        seen[split] = {i for i, _ in origin}
    assert not seen["train_set"] & seen["val_set"] and not seen["train_set"] & seen["test_set"]
    assert not seen["val_set"] & seen["test_set"]
    n_id = sum(1 for _, digit in original_index.values() if digit in (2, 5, 7))
    assert sum(len(s) for s in seen.values()) == n_id
    assert len(seen["val_set"]) == 50
    assert abs(len(seen["test_set"]) - 0.25 * n_id) <= 3  # 25% of each class, rounded
    assert torch.equal(digits.train_labels, _raw(digits.train_set)[1])


def test_digits_split_is_seeded(digits):
    same = DigitsDataModule(id_classes=(2, 5, 7), val_size=50, seed=3)
    same.setup("fit")
    other = DigitsDataModule(id_classes=(2, 5, 7), val_size=50, seed=4)
    other.setup("fit")
    for split in ("train_set", "val_set", "test_set"):
        assert torch.equal(_raw(getattr(same, split))[0], _raw(getattr(digits, split))[0])
    assert not torch.equal(_raw(other.test_set)[0], _raw(digits.test_set)[0])
    assert not torch.equal(_raw(other.train_set)[0], _raw(digits.train_set)[0])


def test_every_sample_is_image_label_index(digits):
    datasets = [digits.train_set, digits.fit_set, digits.val_set, digits.test_set, *digits.ood_test_sets.values()]
    for dataset in datasets:
        for position in (0, len(dataset) - 1):
            sample = dataset[position]
            assert len(sample) == 3
            image, label, index = sample
            assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert isinstance(label, int) and isinstance(index, int) and index == position
    assert all(label == OOD_LABEL for d in digits.ood_test_sets.values() for label in (d[0][1], d[len(d) - 1][1]))


def test_fit_set_uses_the_test_transform_and_train_set_augments(digits):
    torch.manual_seed(0)
    fit_a, fit_b = digits.fit_set[0][0], digits.fit_set[0][0]
    assert torch.equal(fit_a, fit_b)
    mean, std = torch.tensor(digits.mean)[:, None, None], torch.tensor(digits.std)[:, None, None]
    torch.testing.assert_close(fit_a, (_raw(digits.fit_set)[0][0] - mean) / std)
    crops = torch.stack([digits.train_set[0][0] for _ in range(20)])
    assert not all(torch.equal(crops[0], c) for c in crops[1:])  # random crop


def test_digits_ood_sets(digits, original_index):
    assert digits.ood_groups() == {"digits_heldout": "near", "photo_patches": "far"}
    heldout = digits.ood_test_sets["digits_heldout"]
    images, digit_labels = _raw(heldout)
    assert set(digit_labels.tolist()) == set(range(10)) - {2, 5, 7}
    assert len(heldout) == sum(1 for _, d in original_index.values() if d not in (2, 5, 7))
    patches = _raw(digits.ood_test_sets["photo_patches"])[0]
    assert patches.shape == (500, 3, 32, 32)
    assert torch.equal(patches, photo_patches(500, 32, seed=3))
    assert not torch.equal(patches, photo_patches(500, 32, seed=4))
    # colour photographs, not (grey) digits: in [0, 1], colour channels differ, smooth
    # (neighbouring pixels strongly correlated, unlike noise)
    assert patches.amin() >= 0 and patches.amax() <= 1
    assert not torch.equal(patches[:, 0], patches[:, 1])
    assert (patches.std(dim=(1, 2, 3)) > 0.005).all()
    left, right = patches[..., :-1].flatten(), patches[..., 1:].flatten()
    assert torch.corrcoef(torch.stack([left, right]))[0, 1] > 0.9
    noise = torch.rand_like(patches)
    assert torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1] < 0.1
    assert torch.equal(images[:, 0], images[:, 1])
    assert not any(p.numpy().tobytes() in original_index for p in patches[:20])


def test_test_dataloader_order_is_id_then_ood(digits):
    loaders = digits.test_dataloader()
    assert [loader.dataset for loader in loaders] == [
        digits.test_set, digits.ood_test_sets["digits_heldout"], digits.ood_test_sets["photo_patches"]
    ]
    id_labels = torch.cat([b[1] for b in loaders[0]])
    assert id_labels.min() >= 0 and id_labels.max() == 2
    for loader in loaders[1:]:
        batch = next(iter(loader))
        assert (batch[1] == OOD_LABEL).all()
        assert torch.equal(batch[2], torch.arange(len(batch[2])))  # test loaders are not shuffled
    assert len(digits.val_dataloader()) == 1


def test_digits_validation():
    with pytest.raises(ValueError, match="at least two distinct digits"):
        DigitsDataModule(id_classes=(3,))
    with pytest.raises(ValueError, match="at least two distinct digits"):
        DigitsDataModule(id_classes=(3, 11))
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataModule(test_fraction=1.0)
    with pytest.raises(ValueError, match="group must be 'near' or 'far'"):
        DigitsDataModule(ood_sets=[{"name": "photo_patches", "group": "middle"}])


def test_ood_set_errors_on_digits():
    dm = DigitsDataModule(ood_sets=[OODSet("photo_patches"), OODSet("photo_patches", "near")])
    with pytest.raises(ValueError, match="must be unique"):
        dm.setup("test")
    dm = DigitsDataModule(ood_sets=[{"name": "lsun", "group": "far"}])
    with pytest.raises(ValueError, match="unknown OOD set 'lsun'.*path:.*cifar100"):
        dm.setup("test")
    assert "photo_patches" in known_ood_sets() and "textures" in known_ood_sets()


def test_known_ood_sets_lists_the_torchvision_then_the_digits_sets():
    assert known_ood_sets() == ("cifar10", "cifar100", "svhn", "mnist", "fashion_mnist", "textures", "places365",
                                "digits_heldout", "photo_patches")
    assert DigitsDataModule.named_ood_sets() == ("digits_heldout", "photo_patches")
    assert CIFAR10DataModule.named_ood_sets() == ()


@pytest.mark.parametrize("name", ["digits_heldout", "photo_patches"])
def test_digits_ood_sets_on_another_datamodule_name_the_digits_datamodule(name, tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path), ood_sets=[OODSet(name)])
    assert dm.named_ood_set(name) is None
    with pytest.raises(ValueError, match=f"OOD set '{name}' is only defined for the digits datamodule"):
        dm.build_ood(dm.ood_sets[0])


def test_a_datamodule_supplies_its_own_named_ood_set(digits):
    """``named_ood_set`` is asked first; its dataset gets the test transform and OOD labels."""
    class WithNoise(DigitsDataModule):
        def named_ood_set(self, name):
            if name == "noise":
                return torch.utils.data.TensorDataset(torch.rand(7, 3, 32, 32), torch.zeros(7))
            return super().named_ood_set(name)

    dm = WithNoise(id_classes=(2, 5, 7), val_size=50, seed=3,
                   ood_sets=[OODSet("noise"), OODSet("digits_heldout", "near")])
    dm.setup("test")
    noise = dm.ood_test_sets["noise"]
    assert len(noise) == 7 and {noise[i][1] for i in range(7)} == {OOD_LABEL}
    assert torch.equal(_raw(dm.ood_test_sets["digits_heldout"])[0], _raw(digits.ood_test_sets["digits_heldout"])[0])
    assert "noise" not in known_ood_sets()  # only an override of named_ood_sets registers names


# ---------------------------------------------------------------------- class balance
def test_class_balanced_subset_balance():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)[torch.randperm(85, generator=torch.Generator().manual_seed(0))]
    picked = class_balanced_subset(labels, 30, seed=1)
    assert len(picked) == 30 and len(picked.unique()) == 30
    assert torch.equal(picked, picked.sort().values)
    counts = torch.bincount(labels[picked], minlength=3).tolist()
    assert counts[2] == 5 and sorted(counts[:2]) == [12, 13]  # the small class is exhausted
    even = class_balanced_subset(labels, 9, seed=1)
    assert torch.bincount(labels[even], minlength=3).tolist() == [3, 3, 3]


def test_class_balanced_subset_determinism_and_limits():
    labels = torch.arange(100) % 4
    a, b = class_balanced_subset(labels, 20, seed=7), class_balanced_subset(labels, 20, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, class_balanced_subset(labels, 20, seed=8))
    assert torch.equal(class_balanced_subset(labels, None), torch.arange(100))
    assert torch.equal(class_balanced_subset(labels, 500), torch.arange(100))


def _fit_indices(dm, max_samples):
    return torch.cat([batch[2] for batch in dm.fit_dataloader(max_samples)])


def test_fit_dataloader_covers_the_subset_exactly_once(digits, monkeypatch):
    expected = class_balanced_subset(digits.train_labels, 101, digits.seed)
    indices = _fit_indices(digits, 101)
    assert len(indices) == 101 and torch.equal(indices.sort().values, expected)
    assert torch.bincount(digits.train_labels[indices], minlength=3).tolist() in ([34, 34, 33], [34, 33, 34], [33, 34, 34])
    # sharded over two ranks: disjoint, together exactly the subset, no padding
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(data_base, "rank_and_world", lambda rank=rank: (rank, 2))
        shards.append(_fit_indices(digits, 101))
    assert {len(shards[0]), len(shards[1])} == {50, 51}
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert torch.equal(torch.cat(shards).sort().values, expected)
    monkeypatch.undo()
    assert len(_fit_indices(digits, None)) == len(digits.fit_set)


# ------------------------------------------------------------------------ image folders
@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    for c, cls in enumerate(("cat", "dog", "eel")):
        write_random_images(root / "train" / cls, 4, seed=c)
        write_random_images(root / "test" / cls, 2, seed=10 + c)
    write_random_images(root / "ood" / "nested", 3, seed=20)  # OOD images may sit in sub-folders
    write_random_images(root / "test_other" / "cat", 1, seed=30)
    write_random_images(root / "test_other" / "fox", 1, seed=31)
    os.makedirs(root / "empty_ood" / "sub")
    (root / "empty_ood" / "notes.txt").write_text("no images here")
    return root


def test_image_folder_datamodule(image_tree):
    dm = ImageFolderDataModule(
        str(image_tree / "train"), str(image_tree / "test"), image_size=32, batch_size=4, num_workers=0, val_size=2,
        ood_sets=[{"name": "my_ood", "group": "near", "path": str(image_tree / "ood")}],
    )
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "eel"]
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 2, 6)
    assert dm.ood_groups() == {"my_ood": "near"}
    loaders = dm.test_dataloader()
    assert len(loaders) == 2 and loaders[1].dataset is dm.ood_test_sets["my_ood"]
    images, labels, indices = next(iter(loaders[0]))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1] and indices.tolist() == [0, 1, 2, 3]
    ood_images, ood_labels, ood_indices = next(iter(loaders[1]))
    assert ood_images.shape == (3, 3, 32, 32) and (ood_labels == OOD_LABEL).all() and ood_indices.tolist() == [0, 1, 2]
    assert sorted(dm.train_labels.tolist()) == sorted(dm.train_set[i][1] for i in range(10))
    train_images, _, _ = next(iter(dm.train_dataloader()))
    assert train_images.shape == (4, 3, 32, 32)


def test_image_folder_imagenet_pipeline_size(image_tree):
    dm = ImageFolderDataModule(str(image_tree / "train"), str(image_tree / "test"), image_size=96, val_size=0, num_workers=0)
    dm.setup("fit")
    assert dm.fit_set[0][0].shape == (3, 96, 96) and dm.train_set[0][0].shape == (3, 96, 96)


def test_image_folder_errors(image_tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*one sub-folder of images per class"):
        ImageFolderDataModule(str(tmp_path / "missing" / "train"), str(image_tree / "test"))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataModule(str(image_tree / "train"), str(tmp_path / "missing_val"))
    dm = ImageFolderDataModule(str(image_tree / "train"), str(image_tree / "test_other"), image_size=32, val_size=1)
    with pytest.raises(ValueError, match="must hold the same class folders"):
        dm.setup("fit")
    dm = ImageFolderDataModule(
        str(image_tree / "train"), str(image_tree / "test"), image_size=32, val_size=1,
        ood_sets=[{"name": "empty", "path": str(image_tree / "empty_ood")}],
    )
    dm.setup("fit")  # OOD sets are only built for testing
    with pytest.raises(FileNotFoundError, match="holds no images"):
        dm.setup("test")
    dm = ImageFolderDataModule(
        str(image_tree / "train"), str(image_tree / "test"), image_size=32, val_size=1,
        ood_sets=[{"name": "gone", "path": str(tmp_path / "gone")}],
    )
    with pytest.raises(FileNotFoundError, match="OOD folder not found"):
        dm.setup("test")


# ----------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule])
def test_missing_cifar_without_download_names_the_fix(cls, tmp_path):
    dm = cls(root=str(tmp_path), download=False, ood_sets=[{"name": "svhn"}])
    assert dm.num_classes == (10 if cls is CIFAR10DataModule else 100)
    with pytest.raises(FileNotFoundError, match=r"not found under .*--data\.download true.*--data\.root"):
        dm.setup("fit")
    assert not any(tmp_path.iterdir())  # nothing downloaded


def test_prepare_data_downloads_the_torchvision_ood_sets_once(monkeypatch, tmp_path):
    """Downloads happen in prepare_data (one process per node), not in every rank's setup."""
    import lightning_ood.data.torchvision_sets as tv_sets

    calls = []
    monkeypatch.setattr(tv_sets, "open_torchvision", lambda name, root, train, download: calls.append((name, train, download)))
    ood_sets = [{"name": "cifar100", "group": "near"}, {"name": "tin", "group": "near", "path": str(tmp_path)},
                {"name": "svhn"}, {"name": "places365"}]
    CIFAR10DataModule(root=str(tmp_path), download=True, ood_sets=ood_sets).prepare_data()
    assert calls == [("cifar10", True, True), ("cifar10", False, True), ("cifar100", False, True),
                     ("svhn", False, True), ("places365", False, True)]
    calls.clear()
    CIFAR10DataModule(root=str(tmp_path), download=False, ood_sets=ood_sets).prepare_data()
    assert calls == []


def test_cifar_mean_std_override():
    dm = CIFAR10DataModule(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert dm.mean == (0.5, 0.5, 0.5) and CIFAR10DataModule().mean == (0.4914, 0.4822, 0.4465)


# ------------------------------------------------------------------ folder OOD sets
def _folder_with_bad_files(root, kind, n_bad=1):
    """3 good PNGs plus ``n_bad`` bad ones: text named .png, or a real PNG cut to a third."""
    folder = root / "ood"
    write_random_images(folder, 3, seed=0)
    good = (folder / "0.png").read_bytes()
    for i in range(n_bad):
        bad = folder / "sub" / f"bad{i}.png"
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(b"not an image" if kind == "text" else good[: len(good) // 3])
    return folder


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_undecodable_ood_files_fail_at_setup_naming_the_file(tmp_path, kind):
    """setup("test") is what OODEvaluation.setup runs before the first epoch."""
    folder = _folder_with_bad_files(tmp_path, kind)
    dm = DigitsDataModule(ood_sets=[OODSet("mine", "far", str(folder))])
    reason = "UnidentifiedImageError" if kind == "text" else "OSError: image file is truncated"
    with pytest.raises(ValueError, match=rf"OOD set 'mine': 1 of 4 files under {folder} do not decode as images: "
                                         rf"{folder / 'sub' / 'bad0.png'} \({reason}.*\)\. Delete or replace "
                                         r"them, or point `path` elsewhere"):
        dm.setup("test")


def test_many_undecodable_files_are_counted_and_the_first_five_named(tmp_path):
    folder = _folder_with_bad_files(tmp_path, "text", n_bad=7)
    dm = DigitsDataModule(ood_sets=[OODSet("mine", "far", str(folder))])
    with pytest.raises(ValueError, match=r"7 of 10 files .*bad4\.png .*; and 2 more\. Delete") as caught:
        dm.setup("test")
    assert "bad5.png" not in str(caught.value)


def test_an_ood_image_that_breaks_after_setup_is_named_when_read(tmp_path):
    folder = tmp_path / "ood"
    write_random_images(folder, 3, seed=0)
    files = ImageFiles(str(folder))
    good = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(good[: len(good) // 3])  # truncated after the start-up check
    assert files[0][0].size == (40, 40)
    with pytest.raises(ValueError, match=rf"OOD image {folder / '1.png'} does not decode \(OSError: image file is "
                                         r"truncated.*\): delete or replace it"):
        files[1]


def test_folder_ood_sets_work_on_the_digits_datamodule(tmp_path):
    from PIL import Image
    from torchvision.transforms import functional as TF

    write_random_images(tmp_path / "ood", 3, seed=0, size=(40, 48))  # 40 high, 48 wide
    dm = DigitsDataModule(batch_size=2, ood_sets=[OODSet("mine", "far", str(tmp_path / "ood"))])
    dm.setup("test")
    image, label, index = dm.ood_test_sets["mine"][1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == OOD_LABEL and index == 1
    # like the digits' own images: shorter side to 32, centre crop, [0, 1], then their normalisation
    with Image.open(tmp_path / "ood" / "1.png") as img:
        raw = TF.to_tensor(TF.center_crop(TF.resize(img.convert("RGB"), [32, 38]), [32, 32]))
    mean, std = torch.tensor(dm.mean)[:, None, None], torch.tensor(dm.std)[:, None, None]
    torch.testing.assert_close(image, (raw - mean) / std)
    images, labels, _ = next(iter(dm.test_dataloader()[1]))
    assert images.shape == (2, 3, 32, 32) and (labels == OOD_LABEL).all()


def test_a_folder_transform_that_does_not_give_tensors_fails_at_setup(tmp_path):
    """A datamodule whose test transform takes tensors and that keeps the default folder
    transform (as the digits did) fails when the set is built, naming the hook."""
    class TensorOnly(DigitsDataModule):
        def folder_transform(self):
            return self.test_transform()

    class WrongSize(DigitsDataModule):
        def folder_transform(self):
            from torchvision import transforms as T

            return T.Compose([T.ToTensor(), self.test_transform()])

    write_random_images(tmp_path / "ood", 2, seed=0)
    for cls, message in ((TensorOnly, r"TensorOnly\.folder_transform\(\) fails on .*0\.png \(TypeError"),
                         (WrongSize, r"turns .*0\.png into a torch\.float32 tensor of shape \(3, 40, 40\), "
                                     r"not a \(C, 32, 32\) float tensor")):
        dm = cls(ood_sets=[OODSet("mine", "far", str(tmp_path / "ood"))])
        with pytest.raises(TypeError, match=message + r".*override folder_transform\(\)"):
            dm.setup("test")


# --------------------------------------------------------------- numbers checked early
@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), r"batch_size must be >= 1, got 0"),
    (dict(batch_size=8.0), r"batch_size must be an integer, got 8\.0"),
    (dict(num_workers=-1), r"num_workers must be >= 0, got -1"),
    (dict(val_size=-5), r"val_size must be >= 0, got -5"),
    (dict(val_size=2.5), r"val_size must be an integer, got 2\.5"),
    (dict(val_size=403), r"val_size must be < 403 \(the number of ID training images\), got 403"),
    (dict(seed=-1), r"seed must be in 0 \.\. 4294967295 .*got -1"),
    (dict(seed=2**32), r"seed must be in 0 \.\. 4294967295 .*got 4294967296"),
    (dict(test_fraction=0.0), r"test_fraction must be > 0 and < 1, got 0\.0"),
    (dict(test_fraction=float("nan")), r"test_fraction must be a number, got nan"),
    (dict(test_fraction=0.001), r"test_fraction=0\.001 leaves digit 2 \(177 images\) without a test image: "
                                r"use a test_fraction between 1/177 and 1 - 1/177"),
    (dict(test_fraction=0.999, val_size=0), r"without a training image"),
])
def test_digits_numbers_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(id_classes=(2, 5, 7), **kwargs)


def test_digits_numbers_at_the_edges_are_accepted():
    DigitsDataModule(id_classes=(2, 5, 7), val_size=402, seed=2**32 - 1, num_workers=0)
    DigitsDataModule(id_classes=(2, 5, 7), test_fraction=1 / 177, val_size=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=0), r"image_size must be >= 1, got 0"),
    (dict(image_size=32.5), r"image_size must be an integer, got 32\.5"),
    (dict(std=(0.2, 0.0, 0.2)), r"std\[1\] must be > 0, got 0\.0"),
    (dict(mean=(0.5, 0.5)), r"mean must be 3 numbers \(one per channel\), got \(0\.5, 0\.5\)"),
    (dict(num_workers=-2), r"num_workers must be >= 0, got -2"),
])
def test_image_folder_numbers_are_checked_at_construction(image_tree, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(str(image_tree / "train"), str(image_tree / "test"), **kwargs)


def test_a_val_size_that_leaves_no_training_image_fails_at_setup(image_tree):
    dm = ImageFolderDataModule(str(image_tree / "train"), str(image_tree / "test"), image_size=32, val_size=12)
    with pytest.raises(ValueError, match=r"val_size must be < 12 \(the number of ID training images\), got 12.*"
                                         r"lower val_size"):
        dm.setup("fit")


@pytest.mark.parametrize("kwargs, message", [
    (dict(std=(0.2, 0.2, -0.1)), r"std\[2\] must be > 0, got -0\.1"),
    (dict(mean=(0.5, float("inf"), 0.5)), r"mean\[1\] must be a number, got inf"),
    (dict(val_size=-1), r"val_size must be >= 0, got -1"),
])
def test_torchvision_numbers_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(**kwargs)


def test_helper_numbers_are_checked():
    with pytest.raises(ValueError, match=r"max_samples must be >= 1, got -5"):
        class_balanced_subset(torch.arange(10) % 2, -5)
    with pytest.raises(ValueError, match=r"max_samples must be >= 1, got 0"):
        class_balanced_subset(torch.arange(10) % 2, 0)
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        photo_patches(0)
    with pytest.raises(ValueError, match=r"size must be >= 1, got 0"):
        load_digit_images(0)
