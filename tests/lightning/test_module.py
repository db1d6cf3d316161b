"""OODClassifier: the objectives train, checkpoints round-trip, mismatches fail clearly."""
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.data import DigitsDataModule
from lightning_ood.detectors.base import ForwardOutputs
from lightning_ood.nn.heads import IsoMaxPlusHead, L2NormalizedHead, LinearHead
from lightning_ood.lightning.module import OODClassifier


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _fixed_batch(n: int = 32):
    """A fixed batch of real digit images (6 classes), as (images, labels, indices)."""
    dm = DigitsDataModule(batch_size=n, seed=0)
    dm.setup("fit")
    images, labels, indices = next(iter(DataLoader(dm.fit_set, batch_size=n)))
    return images, labels, indices


class _RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize(
    "loss, kwargs, head_type, ratio",
    [
        ("ce", {"lr": 0.2}, LinearHead, 0.5),
        ("isomax_plus", {"lr": 0.2}, IsoMaxPlusHead, 0.5),
        # tau = 1 (the paper): logits of unit features are bounded by ||w_c||, so the loss
        # moves slowly away from ln(6) in a few steps; tau = 0.1 (T2FNorm) learns fast
        ("l2_norm", {"lr": 0.2}, L2NormalizedHead, 0.97),
        ("l2_norm", {"lr": 0.05, "l2_temperature": 0.1}, L2NormalizedHead, 0.6),
    ],
    ids=["ce", "isomax_plus", "l2_norm", "l2_norm_tau0.1"],
)
def test_each_loss_decreases_on_a_fixed_batch(loss, kwargs, head_type, ratio):
    pl.seed_everything(0)
    images, labels, indices = _fixed_batch()
    loader = DataLoader(TensorDataset(images, labels, indices), batch_size=len(images), shuffle=False)
    model = OODClassifier(loss=loss, num_classes=6, width=8, scheduler="none", **kwargs)
    assert isinstance(model.head, head_type)
    recorder = _RecordLosses()
    _trainer(max_steps=10, callbacks=[recorder]).fit(model, train_dataloaders=loader)
    losses = recorder.losses
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - math.log(6)) < 0.5  # starts near chance
    assert sum(losses[-3:]) / 3 < ratio * losses[0], f"{loss}: {losses}"
    assert losses[-1] < losses[0]


def test_training_step_uses_entropic_scale_for_isomax_plus():
    torch.manual_seed(0)
    images, labels, indices = _fixed_batch(8)
    model = OODClassifier(loss="isomax_plus", num_classes=6, width=8, entropic_scale=3.0)
    model.train()
    torch.manual_seed(1)
    loss = model.training_step((images, labels, indices), 0)
    with torch.no_grad():
        logits = model(images)
    expected = torch.nn.functional.cross_entropy(3.0 * logits, labels)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_forward_outputs_bundle():
    torch.manual_seed(0)
    model = OODClassifier(num_classes=6, width=8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_outputs(x, with_block_norms=True)
        plain = model.forward_outputs(x)
    assert isinstance(out, ForwardOutputs)
    assert out.logits.shape == (3, 6) and out.features.shape == (3, 64)
    assert out.block_norms.shape == (3, 8)
    # FeatureNorm (docs/methods.md) of every residual block, from hand-written hooks:
    # (1/M) sum_m sqrt(sum_hw ReLU(z)^2), blocks in forward order layer1.0 ... layer4.1
    maps = []
    blocks = [m for name, m in model.backbone.named_modules() if name.count(".") == 1 and name.startswith("layer")]
    handles = [b.register_forward_hook(lambda mod, inp, z: maps.append(z.detach().double())) for b in blocks]
    with torch.no_grad():
        model.backbone(x)
    for h in handles:
        h.remove()
    assert len(maps) == 8
    expected = torch.stack([z.clamp(min=0).pow(2).sum(dim=(2, 3)).sqrt().mean(dim=1) for z in maps], dim=1)
    torch.testing.assert_close(out.block_norms.double(), expected, atol=1e-5, rtol=1e-5)
    assert plain.block_norms is None
    torch.testing.assert_close(out.logits, model(x))
    torch.testing.assert_close(out.logits, model.head(out.features))


def test_block_norms_rectify_the_block_outputs():
    """torchvision's blocks end in a ReLU, so FeatureNorm's own ReLU never acts on them;
    here a hook shifts every block output by -0.3 (about half its entries become negative)
    and the block norms must be those of the ReLU'd shifted maps, computed by hand:
    (1/M) sum_m sqrt(sum_hw max(z - 0.3, 0)^2). Without the ReLU, with a sum over channels
    or with an L1 norm they differ."""
    torch.manual_seed(0)
    model = OODClassifier(num_classes=6, width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = []

    def shift(module, args, z):
        maps.append(z.detach().double() - 0.3)
        return z - 0.3

    handles = [block.register_forward_hook(shift) for block in model.backbone.blocks()]
    with torch.no_grad():
        norms = model.forward_outputs(x, with_block_norms=True).block_norms
    for handle in handles:
        handle.remove()
    assert len(maps) == 8 and all(0.2 < float((z < 0).double().mean()) < 0.9 for z in maps)
    expected = torch.stack([z.clamp(min=0).pow(2).sum(dim=(2, 3)).sqrt().mean(dim=1) for z in maps], dim=1)
    torch.testing.assert_close(norms.double(), expected, atol=1e-5, rtol=1e-5)


def test_l2_norm_model_classifies_with_the_unnormalised_path_in_eval():
    torch.manual_seed(0)
    model = OODClassifier(loss="l2_norm", num_classes=6, width=8, l2_temperature=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.backbone(x)
        expected = features @ model.head.weight.T + model.head.bias
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "scheduler, milestones, expected_lrs",
    [("multistep", [2, 3], [0.1, 0.1, 0.01, 0.001]), ("none", None, [0.1, 0.1, 0.1, 0.1])],
)
def test_optimizer_and_schedules(scheduler, milestones, expected_lrs):
    model = OODClassifier(num_classes=6, width=8, lr=0.1, nesterov=True, weight_decay=1e-4,
                          scheduler=scheduler, milestones=milestones)
    config = model.configure_optimizers()
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        if isinstance(config, dict):
            optimizer.step()
            config["lr_scheduler"]["scheduler"].step()
    assert lrs == pytest.approx(expected_lrs)


def test_cosine_schedule_spans_max_epochs():
    model = OODClassifier(num_classes=6, width=8, scheduler="cosine")
    trainer = _trainer(max_epochs=7)
    model.trainer = trainer
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 7


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        OODClassifier(num_classes=1, width=8)
    with pytest.raises(ValueError, match="valid choices: cosine, multistep, none"):
        OODClassifier(num_classes=2, width=8, scheduler="step")
    with pytest.raises(ValueError, match="valid choices: ce, isomax_plus, l2_norm"):
        OODClassifier(num_classes=2, width=8, loss="focal")
    with pytest.raises(ValueError, match="valid choices: resnet18, resnet50"):
        OODClassifier(num_classes=2, width=8, backbone="vit")


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A 10-class IsoMax+ model trained for 2 steps and saved by a Trainer."""
    pl.seed_everything(0)
    dm = DigitsDataModule(id_classes=range(10), batch_size=16, ood_sets=[])
    model = OODClassifier(loss="isomax_plus", num_classes=10, width=8, milestones=[1, 2], scheduler="multistep")
    trainer = _trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    trainer.save_checkpoint(path)
    return path, model


def test_checkpoint_round_trip_load_from_checkpoint(trained_checkpoint):
    path, model = trained_checkpoint
    loaded = OODClassifier.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams["loss"] == "isomax_plus" and loaded.num_classes == 10
    assert loaded.hparams["milestones"] == [1, 2]
    assert isinstance(loaded.head, IsoMaxPlusHead)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key].cpu(), restored[key]), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), atol=0, rtol=0)


def test_checkpoint_loads_with_weights_only(trained_checkpoint):
    path, model = trained_checkpoint
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["num_classes"] == 10
    assert torch.equal(checkpoint["state_dict"]["head.prototypes"], model.head.prototypes.detach().cpu())
    fresh = OODClassifier(**checkpoint["hyper_parameters"])
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)


def test_checkpoint_with_other_class_count_fails_to_resume(trained_checkpoint):
    """Resuming a 10-class checkpoint on the 6-class digits datamodule fails before loading."""
    path, _ = trained_checkpoint
    model = OODClassifier(loss="isomax_plus", num_classes=10, width=8)
    with pytest.raises(ValueError, match="num_classes=10"):
        _trainer(max_steps=3, limit_val_batches=1).fit(model, datamodule=DigitsDataModule(batch_size=16), ckpt_path=str(path))


def test_testing_a_model_on_a_datamodule_with_other_class_count_fails_clearly(trained_checkpoint):
    path, _ = trained_checkpoint
    model = OODClassifier.load_from_checkpoint(path, map_location="cpu")
    with pytest.raises(ValueError, match="num_classes"):
        _trainer(limit_test_batches=1).test(model, datamodule=DigitsDataModule(batch_size=16, ood_sets=[]), verbose=False)
