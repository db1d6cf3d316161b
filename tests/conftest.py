"""Suite-wide test settings."""
import sys

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """The tests use tiny models whose ops are dominated by threading overhead: on a busy
    2-core machine two OpenMP threads per op made a 10-step fit ~20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def wandb_disabled(monkeypatch):
    """No test talks to W&B unless it sets WANDB_MODE itself, and no test's W&B state leaks
    into the next one: Lightning's WandbLogger reuses a run still open in the process, and
    wandb keeps the settings (WANDB_MODE included) of its first set-up until teardown."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
