"""``--model.backbone timm:<name>``: a timm model through the same block mechanism as the
project's ResNets (skipped when the optional timm is not installed)."""
import pytest
import pytorch_lightning as pl
import torch

timm = pytest.importorskip("timm")

from lightning_ood.deploy import load, save_with_detectors  # noqa: E402
from lightning_ood.detectors.functional import feature_norm  # noqa: E402
from lightning_ood.lightning.module import OODClassifier  # noqa: E402
from tests.ddp_eval_script import NUM_CLASSES, RandomOODDataModule, make_callback, trainer_kwargs  # noqa: E402


def test_timm_resnet_blocks_and_features_equal_hand_written_hooks():
    torch.manual_seed(0)
    model = OODClassifier(backbone="timm:resnet18", num_classes=3).eval()
    assert model.block_names == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    assert model.backbone.num_features == 512 and model.head.in_features == 512
    maps, pooled = [], []
    net = model.backbone.net
    handles = [dict(net.named_modules())[name].register_forward_hook(lambda m, a, out: maps.append(out))
               for name in model.block_names]
    handles.append(model.head.register_forward_pre_hook(lambda m, args: pooled.append(args[0])))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = model.forward_outputs(x, with_block_norms=True)
    for handle in handles:
        handle.remove()
    assert torch.equal(outputs.block_norms, torch.stack([feature_norm(z) for z in maps], dim=1))
    assert torch.equal(outputs.features, pooled[0])
    model.check_forward(x)


def test_timm_backbone_evaluates_with_feature_norm_and_round_trips_a_model_file(tmp_path):
    torch.manual_seed(0)
    model = OODClassifier(backbone="timm:resnet18", num_classes=NUM_CLASSES, lr=0.01)
    callback = make_callback(detectors=["msp", "feature_norm"], output_dir=str(tmp_path), save_checkpoint=True)
    pl.Trainer(**trainer_kwargs(callbacks=[callback])).test(model, datamodule=RandomOODDataModule())
    fitted = callback.results["detectors"]["feature_norm"]
    assert fitted["selected_block_name"] == model.block_names[fitted["selected_block"]]
    loaded = load(callback.checkpoint_path)
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        expected = model.detectors["feature_norm"](model.forward_outputs(x, with_block_norms=True))
        torch.testing.assert_close(loaded(x)["scores"]["feature_norm"], expected, rtol=1e-6, atol=1e-6)
    path = save_with_detectors(loaded, tmp_path / "again.ckpt")  # a loaded timm model saves again
    assert load(path).classifier.config["backbone"] == "timm:resnet18"


def test_timm_weights_load_with_pretrained_and_bad_options_are_refused(tmp_path):
    source = timm.create_model("resnet18", num_classes=0)
    torch.save(source.state_dict(), tmp_path / "timm_resnet18.pth")
    model = OODClassifier(backbone="timm:resnet18", num_classes=3, pretrained=str(tmp_path / "timm_resnet18.pth"))
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.backbone.net.state_dict()[name], tensor), name
    with pytest.warns(UserWarning, match="width=16 apply to the project's ResNets and are ignored for timm:resnet18"):
        assert OODClassifier(backbone="timm:resnet18", width=16).backbone.num_features == 512
    with pytest.raises(ValueError, match="timm.list_models"):
        OODClassifier(backbone="timm:no_such_model_xyz")
