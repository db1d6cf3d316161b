"""lightning_ood: PyTorch Lightning image classifiers that know when they don't know."""
from typing import Any

from lightning_ood.version import __version__

__all__ = ["__version__", "load"]


def load(path: Any, map_location: Any = None) -> Any:
    """Load a model with its fitted OOD detectors (``model_with_detectors.ckpt``).

    ``model(model.preprocess(images))`` then gives ``{"logits", "scores", "is_ood"}``;
    see :func:`lightning_ood.deploy.load` (plain torch: serving a model does not need
    pytorch_lightning; imported lazily, so ``import lightning_ood`` stays light).
    """
    from lightning_ood.deploy.load import load as _load

    return _load(path, map_location=map_location)
