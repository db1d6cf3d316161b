"""lightning_ood: PyTorch Lightning image classifiers that know when they don't know."""

__version__ = "0.1.0"
