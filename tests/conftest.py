"""Suite-wide test settings."""
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
    """No test talks to W&B unless it sets WANDB_MODE itself."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
