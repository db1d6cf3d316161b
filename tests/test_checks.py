"""Bad numbers fail at construction (model, callback) and a diverging run stops at its first
non-finite loss, each with a message that names the argument and the fix."""
import pytest
import pytorch_lightning as pl
import torch

from lightning_ood.lightning.callback import OODEvaluation
from lightning_ood.checks import check_number
from lightning_ood.data import DigitsDataModule
from lightning_ood.lightning.module import OODClassifier


def test_check_number_ranges_and_types():
    check_number("x", 0.5, 0, 1)
    check_number("x", None, 1, optional=True)
    check_number("x", 3, 1, integer=True)
    for value, kwargs, message in [
        (0, dict(low=0, low_open=True), r"x must be > 0, got 0"),
        (1, dict(low=0, high=1, high_open=True), r"x must be >= 0 and < 1, got 1"),
        (2.5, dict(low=1, integer=True), r"x must be an integer, got 2.5"),
        (True, dict(low=0), r"x must be a number"),
        (float("nan"), dict(), r"x must be a number, got nan"),
        (float("inf"), dict(), r"x must be a number, got inf"),
        (None, dict(low=1), r"x must be a number, got None"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_number("x", value, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(fit_samples=0), r"fit_samples must be >= 1, got 0"),
    (dict(fit_samples=-5), r"fit_samples must be >= 1, got -5"),
    (dict(tune_samples=0), r"tune_samples must be >= 1, got 0"),
    (dict(fit_samples=2.5), r"fit_samples must be an integer or null"),
    (dict(jigsaw_seed=-1), r"jigsaw_seed must be >= 0"),
    (dict(ash_percentiles=[90, 0.9]), r"ash_percentiles \(a 0-100 scale: 90 means 90 %\) must be > 1 and < 100, got 0.9"),
    (dict(ash_percentiles=[100]), r"must be > 1 and < 100, got 100"),
    (dict(weiper_grid={"dleta": [1.0]}), r"unknown weiper_grid key 'dleta'; valid keys: delta"),
    (dict(weiper_grid={"delta": []}), r"weiper_grid\['delta'\] must be a non-empty list"),
])
def test_callback_numbers_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OODEvaluation(**kwargs)


def test_empty_detector_list_warns():
    with pytest.warns(UserWarning, match=r"detectors=\[\]\): no detector is attached"):
        OODEvaluation(detectors=[])


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-0.1), r"lr must be >= 0, got -0.1"),
    (dict(width=0), r"width must be >= 1, got 0"),
    (dict(momentum=1.5), r"momentum must be >= 0 and <= 1, got 1.5"),
    (dict(l2_temperature=0.0), r"l2_temperature must be > 0, got 0"),
    (dict(entropic_scale=-1.0), r"entropic_scale must be > 0"),
    (dict(weight_decay=float("nan")), r"weight_decay must be a number, got nan"),
])
def test_model_numbers_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OODClassifier(num_classes=3, **kwargs)


def test_zero_learning_rate_warns():
    with pytest.warns(UserWarning, match="lr is 0"):
        OODClassifier(num_classes=3, width=8, lr=0.0)


def test_diverging_training_stops_at_the_first_non_finite_loss():
    torch.manual_seed(0)
    model = OODClassifier(num_classes=6, width=8, lr=1e6)
    losses = []
    original = model._stop_if_diverged
    model._stop_if_diverged = lambda loss: (losses.append(float(loss.detach())), original(loss))[1]
    trainer = pl.Trainer(accelerator="cpu", max_steps=50, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match=r"training diverged: the loss is not finite at epoch 0, step \d+ "
                       r"\(lr=1e\+06\)\. Lower the learning rate \(e\.g\. --model\.lr 100000\)"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    # stopped at the first non-finite loss, long before max_steps
    assert len(losses) < 50 and all(torch.isfinite(torch.tensor(losses[:-1]))) and not torch.isfinite(torch.tensor(losses[-1]))


def test_the_projects_own_deprecations_are_not_silenced():
    """setup.cfg ignores DeprecationWarnings raised in third-party packages only."""
    import warnings

    with pytest.raises(DeprecationWarning, match="old lightning_ood API"):
        warnings.warn_explicit("old lightning_ood API", DeprecationWarning, "lightning_ood/x.py", 1,
                               module="lightning_ood.x")
    warnings.warn_explicit("old torch API", DeprecationWarning, "torch/x.py", 1, module="torch.x")  # ignored


def test_zero_epochs_warn_before_training():
    from types import SimpleNamespace

    from lightning_ood.lightning.cli import OODCLI

    trainer = pl.Trainer(accelerator="cpu", max_epochs=0, logger=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match="max_epochs is 0: nothing is trained"):
        OODCLI.before_fit(SimpleNamespace(trainer=trainer))
