"""Shared test helpers."""

#: Environment for the subprocesses the tests start (one thread each, no W&B account needed).
SUBPROCESS_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
