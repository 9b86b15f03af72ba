"""Geometric complexity under torchrun: measure across ranks, train with DDP.

Run with two processes (NCCL with a GPU per process, else gloo on the CPU)::

    torchrun --standalone --nproc_per_node 2 examples/ddp.py

Each rank measures its shard of the test set and ``geocomplexity.measure``
merges the ranks, so every rank prints the whole test set's GC; rank 0 checks
it against a single-process measurement. Then a few DDP steps with a GC penalty
(the penalty reuses the forward pass, so DDP sees one forward per backward),
and GC again.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from geocomplexity import measure
from geocomplexity.data import load
from geocomplexity.models import mlp
from geocomplexity.regularizers import GeometricComplexity


def main() -> None:
    """Measure, train a little under DDP, measure again."""
    if "RANK" not in os.environ:  # run as a plain script: no launcher, no ranks
        raise SystemExit(
            "examples/ddp.py runs under torchrun, one process per rank: "
            "torchrun --standalone --nproc_per_node 2 examples/ddp.py"
        )
    # NCCL wants a GPU per rank: with fewer GPUs than ranks (two ranks on a
    # one-GPU machine), the whole job runs on the CPU over gloo instead
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= ranks_here
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)

    data = load("digits")  # scikit-learn's 8×8 digits, shipped with the package
    model = mlp(data.x_train.shape[1], [128, 128], data.num_classes, seed=0)
    model = model.to(device)

    # 1. each rank its shard; the value is the whole test set's on every rank
    shard = data.x_test[rank::world]
    gc = measure(model, shard, method="exact", progress=False, distributed=True)
    lines = [None] * world  # printed by rank 0 alone: no interleaved output
    dist.all_gather_object(lines, f"rank {rank}: {len(shard)} samples here, {gc}")
    if rank == 0:
        print("\n".join(lines))
        alone = measure(model, data.x_test, method="exact", distributed=False)
        print(f"single process:          {alone}")
        assert abs(gc.value - alone.value) <= 1e-5 * alone.value
        assert gc.num_samples == alone.num_samples

    # 2. DDP training with a GC penalty
    ddp = DistributedDataParallel(model, device_ids=[device] if cuda else None)
    train = TensorDataset(data.x_train, data.y_train)
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=64, sampler=sampler)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.3)
    penalty = GeometricComplexity(1e-3)  # one Rademacher probe per sample
    penalty.seed(torch.Generator(device=device).manual_seed(rank))
    for epoch in range(2):
        sampler.set_epoch(epoch)
        # the epoch's loss summed over its samples, and their count, on this
        # rank; summed over the ranks below. Printing the last step's loss
        # reported rank 0's final, short batch (15 of 1438 samples) alone
        seen = torch.zeros(2, dtype=torch.float64, device=device)
        for x, y in loader:
            x, y = x.to(device).requires_grad_(), y.to(device)
            out = ddp(x)
            loss = F.cross_entropy(out, y) + penalty(ddp, x, y, outputs=out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen[0] += loss.detach() * len(y)
            seen[1] += len(y)
        dist.all_reduce(seen)  # every rank's samples: the epoch's mean loss
        gc = measure(model, shard, method="exact", progress=False, distributed=True)
        if rank == 0:
            mean, count = (seen[0] / seen[1]).item(), int(seen[1].item())
            print(
                f"epoch {epoch + 1}: mean train loss {mean:.3f} (cross-entropy "
                f"+ penalty, over the {count} samples of all ranks), test {gc}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
