"""Run by tests/test_integrations.py under torchrun (2 processes, gloo, CPU).

Each rank measures its shard, updates a torchmetrics metric, and takes one DDP
step with an exact GC penalty and with each gradient norm; rank 0 writes what
it saw, beside the single-process values, to the JSON file named on the command
line.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from geocomplexity import measure
from geocomplexity.integrations.torchmetrics import GeometricComplexity as Metric
from geocomplexity.regularizers import GeometricComplexity, GradientNorm


def net(d_out: int = 3, d_in: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, 16), torch.nn.Tanh(), torch.nn.Linear(16, d_out)
    ).double()


def main(path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (37,), generator=g)
    model = net()
    out: dict = {"world": world}

    # measure: uneven shards, one rank with no data at all
    for name, shard in (
        ("strided", x[rank::world]),
        ("uneven", x[:30] if rank == 0 else x[30:]),
        ("empty", x if rank == 0 else []),
    ):
        r = measure(model, shard, method="exact", batch_size=8, distributed=True)
        out[name] = [r.value, r.stderr, r.num_samples]
    alone = measure(model, x, method="exact", distributed=False, progress=False)
    out["single"] = [alone.value, alone.stderr, alone.num_samples]
    # the same data on every rank counts every rank's copy: shard it instead
    twice = measure(model, x, method="exact", distributed=True, progress=False)
    out["unsharded_n"] = twice.num_samples
    # auto on a wide output: every rank must pick the same method and probes
    # (40 inputs: exact's forward mode would take d JVPs, were d at most 32)
    wide = net(d_out=64, d_in=40)
    x_wide = torch.randn(37, 40, generator=g, dtype=torch.float64)
    auto = measure(
        wide,
        x_wide[rank::world],
        method="auto",
        rtol=0.2,
        generator=torch.Generator().manual_seed(rank),
        progress=False,
        distributed=True,
    )
    picks = [None] * world
    dist.all_gather_object(picks, (auto.method, auto.num_probes, auto.num_samples))
    out["auto_picks"] = picks

    # an error on one rank is raised on every rank, not left waiting
    bad = x[:4].clone()
    if rank == 1:
        bad[0, 0] = float("nan")
    for method in ("exact", "auto"):
        try:
            measure(model, bad, method=method, distributed=True)
            out[f"error_{method}"] = None
        except Exception as err:  # the test records what each rank saw
            out[f"error_{method}"] = type(err).__name__
        errors = [None] * world
        dist.all_gather_object(errors, out[f"error_{method}"])
        out[f"errors_{method}"] = errors
    # rank 0 alone measures without waiting for anyone
    if rank == 0:
        out["rank0_alone"] = measure(model, x, method="exact").num_samples
    dist.barrier()

    # torchmetrics: states are sums, synced on compute
    metric = Metric(model)
    for batch in x[rank::world].split(4):
        metric.update(batch)
    out["metric"] = metric.compute().item()
    # the standard error of that mean, from the states of every rank too
    out["metric_stderr"] = metric.stderr().item()
    out["metric_local_count"] = metric.count.item()  # the states put back after
    metric.sync()  # synced by hand: read as they are, and left synced
    out["metric_stderr_synced"] = metric.stderr().item()
    metric.unsync()

    # DDP: one step with an exact GC penalty on equal shards = one full-batch step
    half = x[:36].view(world, -1, 5)[rank], y[:36].view(world, -1)[rank]
    ddp = DistributedDataParallel(net())
    xb = half[0].clone().requires_grad_(True)
    outputs = ddp(xb)
    penalty = GeometricComplexity(0.5, method="exact")
    loss = F.cross_entropy(outputs, half[1])
    loss = loss + penalty(ddp, xb, half[1], outputs=outputs)
    loss.backward()
    out["ddp_grads"] = [p.grad.flatten().tolist() for p in ddp.parameters()]
    ref = net()
    xf = x[:36].clone().requires_grad_(True)
    of = ref(xf)
    lf = F.cross_entropy(of, y[:36]) + penalty(ref, xf, y[:36], outputs=of)
    lf.backward()
    out["single_grads"] = [p.grad.flatten().tolist() for p in ref.parameters()]

    # GradientNorm: the norm of the ranks' mean gradient (the one DDP steps
    # on), not the mean of the ranks' norms; each way of calling it, and for
    # the finite difference DDP's all-reduce must see the penalty's gradient
    out["gn_rel_err"] = {}
    for method in ("double_backprop", "finite_difference"):
        term = GradientNorm(0.5, method=method)
        for how in ("call", "backward"):
            for unused in (False, True):
                model = DistributedDataParallel(net(), find_unused_parameters=unused)
                ref = net()
                for m, (xb, yb) in ((model, half), (ref, (x[:36], y[:36]))):
                    o = m(xb)
                    task = F.cross_entropy(o, yb)
                    if how == "call":
                        (task + term(m, xb, yb, outputs=o)).backward()
                    else:
                        term.backward(task, m, xb, yb, outputs=o)
                grads = [torch.cat([p.grad.flatten() for p in m.parameters()])
                         for m in (model, ref)]  # fmt: skip
                err = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
                out["gn_rel_err"][f"{method} {how} unused={unused}"] = err
    if rank == 0:
        with open(path, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
