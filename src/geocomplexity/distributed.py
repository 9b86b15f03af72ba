"""Collectives for measuring inside a ``torch.distributed`` process group.

Each rank measures its shard of the data; the ranks then exchange their
``(count, mean, M2)`` accumulators and merge them in rank order (Chan et al.),
so every rank ends with the same data-set mean and standard error as a single
process measuring all shards. Gloo works on CPU tensors, NCCL on CUDA tensors:
the exchange uses whichever the group's backend needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["active", "all_gather_rows"]


def active(distributed: bool | None) -> bool:
    """Whether to combine results across processes.

    Args:
        distributed: ``None`` (auto): when a process group with more than one
            process is initialized; ``True``: require a process group;
            ``False``: never.

    Returns:
        Whether the caller should run collectives.

    Raises:
        ValueError: ``distributed=True`` without an initialized process group.
    """
    if distributed is False:
        return False
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ValueError(
            "distributed=True needs an initialized process group: call "
            "torch.distributed.init_process_group first (torchrun sets up the "
            "environment), or pass distributed=False"
        )
    return ready and dist.get_world_size() > 1


def _device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(row: list[float]) -> Tensor:
    """Every rank's ``row``, stacked in rank order, on every rank.

    Args:
        row: the same number of floats on every rank.

    Returns:
        A ``(world_size, len(row))`` float64 CPU tensor.
    """
    import torch.distributed as dist

    mine = torch.tensor(row, dtype=torch.float64, device=_device())
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return torch.stack(rows).cpu()
