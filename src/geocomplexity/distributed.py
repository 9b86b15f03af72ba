"""Collectives for measuring inside a ``torch.distributed`` process group.

Each rank measures its shard of the data; the ranks then exchange their
``(count, mean, M2)`` accumulators and merge them in rank order (Chan et al.),
so every rank ends with the same data-set mean and standard error as a single
process measuring all shards. Gloo works on CPU tensors, NCCL on CUDA tensors:
the exchange uses whichever the group's backend needs.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

__all__ = ["active", "all_gather", "all_gather_rows", "raise_if_failed"]


def active(distributed: bool) -> bool:
    """Whether to combine results across processes.

    Args:
        distributed: ``True``: across the initialized process group (a group
            of one process needs no collective); ``False``: never.

    Returns:
        Whether the caller should run collectives.

    Raises:
        ValueError: ``distributed=True`` without an initialized process group.
    """
    if not distributed:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialized process group: call "
            "torch.distributed.init_process_group first (torchrun sets up the "
            "environment), or pass distributed=False"
        )
    return dist.get_world_size() > 1


def _device(hint: torch.device | None) -> torch.device:
    """Where this rank's tensors must be for the default group's collectives.

    The CPU wherever the group has a CPU backend (gloo, or a group made without
    naming one on a machine without GPUs); else this rank's GPU. A group made
    by ``init_process_group()`` on a machine with GPUs has NCCL alone (torch
    picks the accelerator's backend), though its backend reads ``"undefined"``.
    """
    import torch.distributed as dist

    config = getattr(dist, "get_backend_config", None)  # torch >= 2.2
    if config is not None:  # "cpu:gloo,cuda:nccl", "cuda:nccl", ...
        devices = {pair.split(":")[0] for pair in config().split(",")}
        if "cpu" in devices or "cuda" not in devices:
            return torch.device("cpu")
    elif dist.get_backend() != "nccl":
        return torch.device("cpu")
    # NCCL needs this rank's own GPU: the model's, else the current device
    if hint is not None and hint.type == "cuda":
        return hint
    return torch.device("cuda", torch.cuda.current_device())


def all_gather_rows(row: list[float], device: torch.device | None = None) -> Tensor:
    """Every rank's ``row``, stacked in rank order, on every rank.

    Args:
        row: the same number of floats on every rank.
        device: this rank's device (the model's), for NCCL.

    Returns:
        A ``(world_size, len(row))`` float64 CPU tensor.
    """
    mine = torch.tensor(row, dtype=torch.float64, device=_device(device))
    return torch.stack(all_gather(mine)).cpu()


def all_gather(tensor: Tensor, group: Any = None) -> list[Tensor]:
    """Every rank's ``tensor`` (one shape on every rank), in rank order.

    Also the torchmetrics metric's ``dist_sync_fn``: its states are scalars,
    so the shape exchange of torchmetrics' own gather is not needed, and the
    tensors are known to be let go of before this returns (below).

    Args:
        tensor: this rank's tensor, on the device the backend needs.
        group: the process group; ``None`` for the default one.

    Returns:
        ``world_size`` tensors like ``tensor``.
    """
    import torch.distributed as dist

    # a copy of our own: the wait below needs tensors that no one else holds
    mine = tensor.clone(memory_format=torch.contiguous_format)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    # gloo runs it: the group's backend, or the CPU's in a group that names
    # none (init_process_group() reads "undefined", and takes gloo for the CPU)
    if mine.device.type == "cpu" or dist.get_backend(group) == "gloo":
        _wait_until_released([mine, *gathered])
    return gathered


def _wait_until_released(tensors: list[Tensor], timeout: float = 5.0) -> None:
    """Wait until no one but the caller holds ``tensors``.

    Gloo marks a collective done before its worker thread lets go of the work,
    and the work holds the collective's tensors. Were the worker's reference
    the last, the worker thread would free these Python-made tensors, which
    takes the GIL; during interpreter shutdown that aborts the process
    ("terminate called without an active exception"). That happened at the
    exit of about one torchrun job in fifteen whose DDP model kept the group
    alive past ``destroy_process_group``. Waiting here (microseconds, when it
    waits at all) leaves the freeing to the calling thread.

    Args:
        tensors: the tensors handed to the collective.
        timeout: seconds after which to stop waiting; the wait guards against
            a crash at exit and is never worth a hang.
    """
    if not hasattr(torch.Tensor, "_use_count"):  # a torch without it: no wait
        return
    deadline = time.monotonic() + timeout
    # _use_count: references to the tensor's TensorImpl; 1 is the caller's
    # Python object alone
    while any(t._use_count() > 1 for t in tensors) and time.monotonic() < deadline:
        time.sleep(1e-4)


def raise_if_failed(flags: Tensor, failure: BaseException | None) -> None:
    """Raise on every rank when any rank failed before a collective.

    Args:
        flags: each rank's failure flag (1.0 when it failed), in rank order.
        failure: this rank's own exception, if any.

    Raises:
        BaseException: this rank's own error, or a ``RuntimeError`` naming the
            ranks that failed.
    """
    if failure is not None:
        raise failure
    failed = [i for i, f in enumerate(flags.tolist()) if f]
    if failed:
        raise RuntimeError(
            f"geometric complexity failed on rank(s) {failed}; see their error"
        )
