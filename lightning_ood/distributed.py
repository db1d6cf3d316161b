"""Collectives that are no-ops in a single process, so detectors fit identically on 1 or N ranks."""
from __future__ import annotations

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
