"""Collectives that are no-ops in a single process, so detectors fit identically on 1 or N ranks.

The package's rule for multi-process code (every contributor, every file):

1. A collective (``all_reduce``, ``all_gather``/``gather_all_tensors``, ``strategy.broadcast``,
   ``barrier``, ``reduce_boolean_decision``, ``trainer.log_dir``, :func:`lightning_ood.lightning.runs.run_directory`,
   and torchmetrics ``Metric.compute()`` unless built with ``sync_on_compute=False``) is called by
   **every rank or by none**, the same number of times, in the same order.
2. Rank-0-only code (``if trainer.is_global_zero``, ``rank_zero_only``, Lightning's
   ``SaveConfigCallback.save_config``: reports, plots, files, W&B) **never calls anything that
   syncs**. Compute what it needs on every rank first and pass the value in.
3. Every multi-process test has a hard timeout, so breaking 1 or 2 fails in minutes.

Audited sites (2026-12): ``runs.run_directory`` (collective; called from ``setup`` and
``on_test_epoch_end`` on every rank), ``cli.SaveConfigToRun`` (resolves it in ``setup``),
``callbacks.OODEvaluation`` (gather, ``all_reduce`` of the minimum feature and the detectors'
fits on every rank; ``write_report`` / ``save_after_evaluation`` on rank 0 sync nothing),
``metrics`` (``sync_on_compute=False`` on gathered scores), ``module._stop_if_diverged``
(``reduce_boolean_decision`` every step on every rank), WeiPer / FeatureNorm ``fit``
(``all_reduce`` on every rank).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """Reduce ``tensor`` across ranks (``op`` in sum/min/max); returns a new tensor."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"unknown reduce op {op!r}; use one of {sorted(ops)}")
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=ops[op])
    return out


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's rows concatenated in rank order (shards may differ in length); a copy
    of ``tensor`` on one process. Memory: the total number of rows on every rank."""
    if not is_distributed():
        return tensor.detach().clone()
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.cat(gather_all_tensors(tensor.detach().contiguous()))
