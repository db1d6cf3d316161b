"""Shared test helpers."""

#: Environment for the subprocesses the tests start (one thread each, no W&B account needed).
SUBPROCESS_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_random_images(folder, n: int, seed: int, size: tuple[int, int] = (40, 40)) -> None:
    """``n`` random RGB PNGs ``0.png`` ... in ``folder`` (created), reproducible from ``seed``."""
    import os

    import torch
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(n):
        pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
