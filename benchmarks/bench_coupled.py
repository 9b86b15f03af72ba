"""Train-mode BatchNorm: the GC penalty's cost and spread, two estimators.

Run: ``.venv/bin/python benchmarks/bench_coupled.py [--quick] [--out PATH]``
(``make bench`` runs it). Writes ``benchmarks/results/coupled.json`` and prints
a markdown table for the README.

In train mode BatchNorm couples the samples of a batch, and GC is the mean of
the diagonal blocks ‖∂g(x_i)/∂x_i‖². Two unbiased 1-probe estimators of it, on
the PreAct ResNet-18 of ``bench_measure`` (model (d), batch 32):

- ``paired``: what the library does, two VJPs of the batch, the second with
  each sample's probe sign-flipped (``_decoupled_vjp_sq_norms``);
- ``per sample``: one VJP per sample (``_diag_vjp_sq_norms``), what it did
  before.

Cost: a training step with each as a 1-probe GC penalty (double backward),
as a ratio to a plain step, timed interleaved in one process. Spread: the
standard deviation of the batch mean over independent draws of each, with
the same probes for both in each draw.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_measure
import torch
import torch.nn.functional as F
from bench_measure import (
    Timed,
    add_malloc_option,
    apply_malloc_option,
    cpu_model,
    make_case,
    paired_interval,
    ratio,
    time_interleaved,
)
from torch import Tensor, nn

from geocomplexity import jacobian
from geocomplexity.atomic import write_text
from geocomplexity.probes import draw_probes
from geocomplexity.state import kept_buffers

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "coupled.json"


def _norms(
    which: str, x: Tensor, out: Tensor, gen: torch.Generator, create_graph: bool
) -> Tensor:
    """Per-sample 1-probe estimates of the diagonal blocks, by ``which``."""
    B, k = out.shape
    kw = {"dtype": out.dtype, "device": out.device, "generator": gen}
    u = draw_probes("rademacher", (1, B, k), **kw)
    probes = lambda a, b: u[a:b]  # noqa: E731  # probes(start, stop): (stop-start, B, k)
    if which == "paired":
        t = draw_probes("rademacher", (1, B), **kw)
        return jacobian._decoupled_vjp_sq_norms(x, out, probes, t, 1, create_graph)
    return jacobian._diag_vjp_sq_norms(x, out, probes, 1, 1, create_graph)


def step(
    model: nn.Module, x: Tensor, y: Tensor, which: str | None
) -> Callable[[], None]:
    """A training step, with the 1-probe GC penalty by ``which`` (or none)."""
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: the model stays put
    gen = torch.Generator().manual_seed(0)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        xb = x.detach().requires_grad_(which is not None)
        with kept_buffers(model):
            out = model(xb)
        loss = F.cross_entropy(out, y)
        if which is not None:
            pen = _norms(which, xb, out.reshape(len(xb), -1), gen, True).mean()
            loss = loss + 1e-3 * pen
        loss.backward(inputs=params)
        opt.step()

    return run


def spread(model: nn.Module, x: Tensor, draws: int) -> dict[str, Any]:
    """Mean and standard deviation over draws of each estimator's batch mean."""
    gen = torch.Generator().manual_seed(1)
    means: dict[str, list[float]] = {"paired": [], "per sample": []}
    for _ in range(draws):
        state = gen.get_state()
        for which in means:
            gen.set_state(state)  # the same probes for both
            xg = x.detach().requires_grad_(True)
            with kept_buffers(model):
                out = model(xg).reshape(len(x), -1)
            values = _norms(which, xg, out, gen, False)
            means[which].append(values.detach().mean().item())
    return {
        which: {"mean": statistics.fmean(v), "std": statistics.stdev(v), "draws": v}
        for which, v in means.items()
    }


def markdown(result: dict[str, Any]) -> str:
    t, s = result["timing"], result["spread"]
    lines = [
        "| 1-probe GC penalty, train-mode ResNet-18 (B=32) | step ÷ plain step "
        "| batch-mean GC over draws (mean ± std) |",
        "|---|---|---|",
    ]
    for which in ("paired", "per sample"):
        r, iv = t[which]["ratio"], t[which]["interval"]
        band = f" ({iv[1]:.2f}–{iv[2]:.2f})" if iv else ""
        # a step that raised has no ratio: its error, not a crash of the table
        cell = f"error: {t[which]['error']}" if r is None else f"{r:.2f}×{band}"
        lines.append(
            f"| {which} | {cell} | {s[which]['mean']:.3f} ± {s[which]['std']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=2)
    add_malloc_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = apply_malloc_option(args.malloc)
    case = make_case("d")
    model = case.model.train()
    budget, rounds, draws = (5.0, (3, 4), 4) if args.quick else (30.0, (6, 10), 16)
    print("timing ...", file=sys.stderr)
    methods = {
        "plain": Timed(step(model, case.x, case.y, None)),
        "paired": Timed(step(model, case.x, case.y, "paired")),
        "per sample": Timed(step(model, case.x, case.y, "per sample")),
    }
    time_interleaved(methods, budget, *rounds)
    plain = methods["plain"]
    timing = {}
    for which in ("paired", "per sample"):
        m = methods[which]
        interval = paired_interval(m, plain)
        timing[which] = {
            "ms": m.median_ms,
            "ratio": ratio(m.median_ms, plain.median_ms)
            if interval is None
            else interval[0],
            "interval": interval,
            "error": m.error,
        }
    print("spread ...", file=sys.stderr)
    result = {
        "benchmark": "train-mode BatchNorm GC penalty: paired VJPs vs per-sample VJPs",
        "model": case.name,
        "batch": len(case.x),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpu": cpu_model()},
        "device": str(bench_measure.DEVICE),
        "allocator": allocator,
        "quick": args.quick,
        "timing": timing,
        "spread": spread(model, case.x, draws),
    }
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
