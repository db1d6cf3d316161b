"""OODClassifier: the plain-torch :class:`~lightning_ood.nn.classifier.Classifier` trained
with an OOD-aware objective, as a LightningModule."""
from __future__ import annotations

from typing import Literal, Optional, Union

import pytorch_lightning as pl
import torch
from jsonargparse.typing import restricted_string_type
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_ood.checks import check_number
from lightning_ood.detectors import reads_block_norms
from lightning_ood.nn.classifier import Classifier
from lightning_ood.nn.objectives import objective
from lightning_ood.nn.resnet import split_torchvision_state_dict
from lightning_ood.nn.timm_backbone import TimmBackbone

#: ``timm:<name>`` (checked when the CLI parses the config; the name itself when built).
TimmModelName = restricted_string_type("TimmModelName", r"^timm:\S+$")

Batch = tuple[Tensor, Tensor, Tensor]  # images, labels, sample indices


class OODClassifier(Classifier, pl.LightningModule):
    """An image classifier trained with an OOD-aware objective.

    Args:
        backbone: ``resnet18`` (CIFAR stem by default), ``resnet50`` (ImageNet stem) or
            ``timm:<name>`` (a timm model, e.g. ``timm:convnext_tiny``; optional dependency,
            ``pip install lightning_ood[timm]``). Its blocks feed FeatureNorm like the ResNets'.
        loss: ``ce`` (linear head, softmax cross-entropy), ``isomax_plus`` (IsoMax+
            distance head + entropic-scale loss) or ``l2_norm`` (features L2-normalised
            before the linear head in training only).
        num_classes: number of ID classes (linked from the datamodule by the CLI).
        cifar_stem: override the backbone's default stem.
        width: channels of the first stage (64 = the standard ResNet; all stages scale).
        entropic_scale: IsoMax+ entropic scale E (training only).
        l2_temperature: temperature tau of the ``l2_norm`` objective (1.0 = the paper).
        lr, momentum, nesterov, weight_decay: SGD settings.
        scheduler: ``cosine`` (to 0 over ``max_epochs``), ``multistep`` (x ``gamma`` at
            ``milestones``) or ``none``.
        milestones, gamma: multi-step schedule.
        pretrained: path of a torchvision ResNet ``state_dict`` file to start from (its
            ``fc`` is loaded into a ``ce``/``l2_norm`` head when the shapes match), or, for a
            ``timm:`` backbone, a state_dict of that timm model.
        channels_last: store the backbone's weights and inputs in channels-last memory
            format (faster convolutions on recent GPUs with mixed precision).
        compile: ``torch.compile`` the backbone at the start of fitting (GPU speed-up;
            falls back to eager mode with a warning if compilation is unavailable).
    """

    def __init__(
        self,
        backbone: Union[Literal["resnet18", "resnet50"], TimmModelName] = "resnet18",
        loss: Literal["ce", "isomax_plus", "l2_norm"] = "ce",
        num_classes: int = 10,
        cifar_stem: Optional[bool] = None,
        width: int = 64,
        entropic_scale: float = 10.0,
        l2_temperature: float = 1.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        scheduler: Literal["cosine", "multistep", "none"] = "cosine",
        milestones: Optional[list[int]] = None,
        gamma: float = 0.1,
        pretrained: Optional[str] = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        objective(loss)  # unknown names fail first, listing the valid ones
        super().__init__(backbone=backbone, loss=loss, num_classes=num_classes, cifar_stem=cifar_stem, width=width,
                         l2_temperature=l2_temperature, channels_last=channels_last)
        if scheduler not in ("cosine", "multistep", "none"):
            raise ValueError(f"unknown scheduler {scheduler!r}; valid choices: cosine, multistep, none")
        check_number("width", width, 1, integer=True)
        check_number("entropic_scale", entropic_scale, 0, low_open=True)
        check_number("l2_temperature", l2_temperature, 0, low_open=True)
        check_number("lr", lr, 0)
        check_number("momentum", momentum, 0, 1)
        check_number("weight_decay", weight_decay, 0)
        check_number("gamma", gamma, 0, low_open=True)
        if lr == 0:
            rank_zero_warn("lr is 0: the weights will not change during training")
        self.save_hyperparameters()
        self.criterion = objective(loss).loss
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")
        if pretrained:
            self.load_torchvision_weights(pretrained)

    def load_torchvision_weights(self, path: str) -> None:
        """Load a torchvision ResNet ``state_dict`` file into the backbone (and head); for a
        ``timm:`` backbone, a state_dict of that timm model (its classifier entries are
        left out: the head is the objective's)."""
        from lightning_ood.io import load_state_dict_file

        if isinstance(self.backbone, TimmBackbone):
            state = load_state_dict_file(path)
            own = self.backbone.net.state_dict()
            missing = [k for k in own if k not in state]
            mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                          if k in state and state[k].shape != v.shape]
            if missing or mismatched:
                raise ValueError(f"{path} does not fit {self.hparams['backbone']}: missing {missing[:5]}, shape mismatch "
                                 f"(file vs model) {mismatched[:5]}")
            self.backbone.net.load_state_dict({k: state[k] for k in own})
            return
        backbone_state, head_state = split_torchvision_state_dict(load_state_dict_file(path))
        own = self.backbone.state_dict()
        missing = [k for k in own if k not in backbone_state]
        unexpected = [k for k in backbone_state if k not in own]
        mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in backbone_state.items()
                      if k in own and v.shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{path} does not fit backbone {self.hparams['backbone']!r} (cifar_stem={self.backbone.cifar_stem}, "
                f"width={self.backbone.width}): missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch "
                f"(file vs model) {mismatched[:5]}. torchvision ImageNet ResNets need --model.cifar_stem false "
                "and --model.width 64"
            )
        self.backbone.load_state_dict(backbone_state)
        head_weight = getattr(self.head, "weight", None)
        if head_state and head_weight is not None and head_state["weight"].shape == head_weight.shape:
            self.head.load_state_dict(head_state)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes and data_classes != self.num_classes:
            raise ValueError(
                f"the model has num_classes={self.num_classes} but the datamodule "
                f"{type(datamodule).__name__} has {data_classes} classes: use the data the model "
                "(or checkpoint) was trained on, or a new model"
            )

    def on_fit_start(self) -> None:
        if self.hparams.get("compile") and self._compiled_backbone is None:
            try:
                self.use_compiled_backbone(torch.compile(self.backbone))
            except Exception as err:  # no compiler toolchain: keep eager mode
                rank_zero_warn(f"torch.compile unavailable ({err}); training in eager mode")

    # ------------------------------------------------------------------- steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, labels, _ = batch
        logits = self(images)
        loss = self.criterion(logits, labels, self.hparams["entropic_scale"])
        self._stop_if_diverged(loss)
        self.train_accuracy(logits, labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def _stop_if_diverged(self, loss: Tensor) -> None:
        """Stop at the first non-finite training loss, on every rank at once (the decision is
        reduced across ranks, so no rank is left waiting in the next gradient all-reduce)."""
        diverged = not bool(torch.isfinite(loss.detach()))
        if self._trainer is not None:
            diverged = self.trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            raise FloatingPointError(
                f"training diverged: the loss is not finite at epoch {self.current_epoch}, step {self.global_step} "
                f"(lr={self.hparams['lr']:g}). Lower the learning rate (e.g. --model.lr {self.hparams['lr'] / 10:g}) "
                "or clip gradients (--trainer.gradient_clip_val 5)"
            )

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, labels, _ = batch
        logits = self(images)
        self.val_accuracy(logits, labels)
        self.log("val/acc", self.val_accuracy, prog_bar=True, on_epoch=True)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Dataloader 0 is the ID test set, the others are OOD sets. The outputs of the one
        forward pass are returned for :class:`~lightning_ood.lightning.callback.OODEvaluation`."""
        images, labels, indices = batch
        outputs = self.forward_outputs(images, with_block_norms=self._want_block_norms())
        if dataloader_idx == 0:
            self.test_accuracy(outputs.logits, labels)
            self.log("test/acc", self.test_accuracy, on_epoch=True, add_dataloader_idx=False)
        return {"outputs": outputs, "labels": labels, "indices": indices}

    def _want_block_norms(self) -> bool:
        return reads_block_norms(self.detectors.values())

    # --------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp["lr"], momentum=hp["momentum"],
            nesterov=hp["nesterov"], weight_decay=hp["weight_decay"],
        )
        if hp["scheduler"] == "none":
            return optimizer
        if hp["scheduler"] == "cosine":
            max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, hp["milestones"] or [], hp["gamma"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
