"""Shared test helpers."""
import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one intra-op thread.

    The tests use tiny models whose ops are dominated by threading overhead; on a busy
    2-core machine two OpenMP threads per op made a 10-step fit ~20x slower than one.
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Environment for the subprocesses the tests start (one thread each, no W&B account needed).
SUBPROCESS_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
