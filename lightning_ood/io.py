"""Reading weight files with errors that name the problem and the fix."""
from __future__ import annotations

import os
import pickle
import zipfile

import torch
from torch import Tensor


def load_state_dict_file(path: str, map_location: str | torch.device | None = "cpu") -> dict[str, Tensor]:
    """Load a ``state_dict`` saved with ``torch.save`` safely (``weights_only=True``).

    Accepts a bare state_dict or a dict holding one under ``state_dict`` / ``model``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable PyTorch weights file (truncated, corrupted, or it holds "
            f"objects other than tensors): {err}"
        ) from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj
