"""Files: reading weight files with errors that name the problem and the fix, and atomic writes."""
from __future__ import annotations

import os
import pickle
import uuid
import zipfile
from typing import BinaryIO, Callable

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


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into a temporary file next to ``path``, fsync, then ``os.replace``:
    a reader (or a crash) sees the old file or the whole new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        except OSError:  # some file systems refuse to fsync directories
            pass
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))
