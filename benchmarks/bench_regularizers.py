"""Cost of a regularized training step, as a ratio to a plain step.

Run: ``.venv/bin/python benchmarks/bench_regularizers.py [--quick] [--out PATH]
[--malloc tuned|default]``
(``make bench`` runs it). Writes ``benchmarks/results/regularizers.json`` and
prints a markdown table for the README.

Each step is forward, cross-entropy (+ penalty), backward and an SGD update,
timed in one process with the methods interleaved (see ``bench_measure``). The
penalty reuses the task loss's forward pass: the inputs require grad and
``outputs=`` is handed over, as :func:`geocomplexity.training.fit` does. The
models are those of ``bench_measure`` in eval mode (BatchNorm with running
statistics); a train-mode ResNet column shows what the coupled samples of
train-mode BatchNorm cost the GC penalty (two sign-paired VJPs a probe).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_measure
import torch
import torch.nn.functional as F
from bench_measure import (
    Timed,
    add_device_option,
    add_malloc_option,
    apply_malloc_option,
    cpu_model,
    make_case,
    paired_interval,
    rademacher,
    ratio,
    rel_err,
    time_interleaved,
    verdict,
    warn_check,
)
from torch import Tensor, nn

from geocomplexity.atomic import write_text
from geocomplexity.regularizers import (
    L2,
    GeometricComplexity,
    GradientNorm,
    Regularizer,
    SpectralNorm,
)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "regularizers.json"

# Floors from the issue: penalty step / plain step.
FLOORS = {
    "gc_projection_1": 2.3,
    "gc_projection_1_subsample_0.25": 1.4,
    "gc_exact": 8.0,
    "gradient_norm_double_backprop": 3.0,
    "gradient_norm_finite_difference": 2.2,
    "spectral_norm": 1.15,
}
LAMBDA = 1e-3  # the strength of the terms with a bare reference (see terms())
# the bare penalties that differentiate the task loss's forward pass in the input
BARE_REUSE = ("gc_projection_1", "gc_exact")


def terms() -> dict[str, Regularizer]:
    # on the benchmark's device, as the bare references' generator is: a CPU
    # generator with CUDA inputs draws on the host and copies (a stream sync)
    g = torch.Generator(device=bench_measure.DEVICE).manual_seed(0)
    return {
        "gc_projection_1": GeometricComplexity(LAMBDA, generator=g),
        "gc_projection_1_subsample_0.25": GeometricComplexity(
            LAMBDA, subsample=0.25, generator=g
        ),
        "gc_exact": GeometricComplexity(LAMBDA, method="exact"),
        "gradient_norm_double_backprop": GradientNorm(LAMBDA),
        "gradient_norm_finite_difference": GradientNorm(
            1e-3, method="finite_difference"
        ),
        "spectral_norm": SpectralNorm(1e-3),
        "l2": L2(1e-4),
    }


def step(
    model: nn.Module, x: Tensor, y: Tensor, term: Regularizer | None
) -> Callable[[], None]:
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: the model stays put

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        xb = x.detach().requires_grad_(term is not None and term.reuses_input_grad)
        out = model(xb)
        loss = F.cross_entropy(out, y)
        if term is None:
            loss.backward(inputs=params)  # as fit() does: no input gradient
        else:  # as fit() does: the term backpropagates loss + itself
            term.backward(loss, model, xb, y, outputs=out, params=params)
        opt.step()

    return run


def bare_penalty(
    which: str,
    model: nn.Module,
    x: Tensor,
    xb: Tensor,
    out: Tensor,
    loss: Tensor,
    params: list[Tensor],
    g: torch.Generator,
) -> Tensor:
    """The penalty of :func:`bare_step` (before λ), on its forward pass ``out``."""
    if which == "gradient_norm_double_backprop":
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return sum(gr.pow(2).sum() for gr in grads)
    if which == "gc_projection_1_subsample_0.25":  # its own quarter forward
        m = -(-len(x) // 4)
        idx = torch.randperm(len(x), generator=g, device=x.device)[:m]
        xs = x[idx].requires_grad_(True)
        outs = model(xs)
        (u,) = torch.autograd.grad(outs, xs, rademacher(outs, g), create_graph=True)
        return u.pow(2).sum() / m
    if which == "gc_exact":
        cots = [torch.zeros_like(out) for _ in range(out.shape[1])]
        for j, c in enumerate(cots):
            c[:, j] = 1
    else:
        cots = [rademacher(out, g)]
    return sum(
        torch.autograd.grad(out, xb, c, create_graph=True)[0].pow(2).sum() for c in cots
    ) / len(x)


def bare_step(model: nn.Module, x: Tensor, y: Tensor, which: str) -> Callable[[], None]:
    """The same step written with bare autograd, for the penalties with a floor.

    ``"gc_projection_1"``: Hoffman et al.'s double backward (one Rademacher VJP
    with ``create_graph``); ``"gc_projection_1_subsample_0.25"``: the same on a
    random quarter of the batch through its own forward; ``"gc_exact"``: a loop
    of k such VJPs;
    ``"gradient_norm_double_backprop"``: ``autograd.grad(create_graph=True)``.
    No checks and no bookkeeping: a floor this misses too is out of reach of
    PyTorch autograd on the machine.
    """
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    g = torch.Generator(device=x.device).manual_seed(0)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        xb = x.detach().requires_grad_(which in BARE_REUSE)
        out = model(xb)
        loss = F.cross_entropy(out, y)
        penalty = bare_penalty(which, model, x, xb, out, loss, params, g)
        (loss + LAMBDA * penalty).backward(inputs=params)
        opt.step()

    return run


def check_against_bare(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Relative errors of the library's deterministic penalties against the bare.

    The value and its parameter gradient, for the penalties whose bare reference
    computes the same number (the projections draw different probes): a fast
    but wrong penalty would otherwise look good.
    """
    params = list(model.parameters())
    lib_terms = terms()
    check = {}
    for which in ("gc_exact", "gradient_norm_double_backprop"):
        term = lib_terms[which]
        got = []
        for bare in (False, True):
            reuse = which in BARE_REUSE if bare else term.reuses_input_grad
            xb = x.detach().requires_grad_(reuse)
            out = model(xb)
            loss = F.cross_entropy(out, y)
            if bare:  # the generator goes unused: these penalties draw nothing
                g = torch.Generator(device=x.device)
                pen = LAMBDA * bare_penalty(which, model, x, xb, out, loss, params, g)
            else:
                pen = term(model, xb, y, outputs=out)
            grads = torch.autograd.grad(pen, params, allow_unused=True)
            flat = torch.cat(
                [
                    (torch.zeros_like(p) if gr is None else gr).flatten()
                    for p, gr in zip(params, grads, strict=True)
                ]
            )
            got.append((pen.detach(), flat))
        (v, gv), (ref, gref) = got
        check[f"{which}: rel_err_value"] = rel_err(v, ref)
        check[f"{which}: rel_err_grad"] = ((gv - gref).norm() / gref.norm()).item()
    return check


def quarter_pass(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """Forward and backward of cross-entropy on a quarter of the batch, no update.

    The reference for ``subsample=0.25``: that penalty runs a forward pass, a
    VJP and the VJP's double backward on a quarter of the batch, about twice
    this work, so ``1 + 2 × (this ratio)`` is what it costs when nothing is
    wasted; where small matrix products are slow, that alone exceeds 1.4×.
    """
    params = list(model.parameters())
    m = -(-len(x) // 4)
    xs, ys = x[:m], y[:m]

    def run() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(xs), ys).backward(inputs=params)

    return run


QUARTER = "reference: fwd+bwd on ¼ of the batch"

BARE = (
    "gc_projection_1",
    "gc_projection_1_subsample_0.25",
    "gc_exact",
    "gradient_norm_double_backprop",
)


def bench_case(
    key: str,
    budget_s: float,
    rounds: tuple[int, int],
    train: bool = False,
    only: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    case = make_case(key)
    model = case.model.train(train)
    methods = {"plain": Timed(step(model, case.x, case.y, None))}
    for name, term in terms().items():
        if only is None or name in only:
            methods[name] = Timed(step(model, case.x, case.y, term))
            if name in BARE and not train:
                methods[f"bare autograd: {name}"] = Timed(
                    bare_step(model, case.x, case.y, name)
                )
            if name == "gc_projection_1_subsample_0.25" and not train:
                methods[QUARTER] = Timed(quarter_pass(model, case.x, case.y))
    n = time_interleaved(methods, budget_s, *rounds)
    plain = methods["plain"]
    rows = {}
    for name, m in methods.items():
        # the median of per-round paired ratios (rounds are interleaved, so the
        # pair ran side by side), with its 95% interval; a ratio of medians
        # where too few rounds ran
        paired = paired_interval(m, plain)
        r = ratio(m.median_ms, plain.median_ms) if paired is None else paired[0]
        ref = name.removeprefix("bare autograd: ")
        judged = verdict(r, paired, FLOORS[ref]) if ref in FLOORS else None
        rows[name] = {
            "ms": m.median_ms,
            "ratio_to_plain_step": r,
            "ratio_95_interval": None if paired is None else paired[1:],
            "floor": FLOORS.get(name),
            # pass / fail when the interval clears the floor, noise when not
            "verdict": judged if name in FLOORS else None,
            "passed": {"pass": True, "fail": False}.get(judged)
            if name in FLOORS
            else None,
            "error": m.error,
        }
        if ref != name and judged is not None:
            # a reference, not judged: would bare autograd meet the floor?
            rows[name]["reference_verdict"] = judged
    label = case.name + (" (train mode)" if train else "")
    record = {"name": label, "batch": len(case.x), "rounds": n, "methods": rows}
    if not train and only is None:
        # the library's penalties must compute what their bare references do
        record["check"] = check_against_bare(model, case.x, case.y)
        warn_check(label, record["check"])
    return record


def markdown(result: dict[str, Any]) -> str:
    cases = result["cases"]
    names = list(next(iter(cases.values()))["methods"])
    head = (
        "| penalty (step ÷ plain step) | floor | "
        + " | ".join(c["name"] for c in cases.values())
        + " |"
    )
    lines = [head, "|---|---|" + "---|" * len(cases)]
    for name in names:
        cells = []
        for c in cases.values():
            m = c["methods"].get(name)
            if m is not None and m["error"] is not None:
                cells.append("error")  # listed below the table
            elif m is None or m["ratio_to_plain_step"] is None:
                cells.append("—")
            else:
                v = m.get("verdict") or m.get("reference_verdict")
                mark = {"fail": " ✗", "noise": " ~"}.get(v or "", "")
                cells.append(f"{m['ratio_to_plain_step']:.2f}×{mark}")
        ref = name.removeprefix("bare autograd: ")
        floor = f"≤ {FLOORS[name]:.2f}×" if name in FLOORS else ""
        if ref != name and ref in FLOORS:
            floor = f"(ref.) ≤ {FLOORS[ref]:.2f}×"
        lines.append(f"| {name} | {floor} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "`bare autograd:` rows are the same step written with plain autograd and "
        "no checks (Hoffman et al.'s double backward; a loop of k VJPs with "
        "`create_graph` for the exact penalty), timed in the same process: where "
        "one misses the floor (✗), PyTorch autograd cannot reach it on this machine. "
        "Ratios are medians of per-round paired ratios; ✗ marks a floor missed "
        "beyond the 95% interval, ~ one that lies inside it (noise).",
    ]
    errors = [
        f"- {c['name']} {name}: `{m['error']}`"
        for c in cases.values()
        for name, m in c["methods"].items()
        if m["error"] is not None
    ]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def floor_verdicts(cases: dict[str, Any]) -> dict[str, int]:
    """Pass / fail / noise counts over the eval-mode cases' floored steps.

    A floored step that raised counts as ``error``: left out, it would read as
    one floor fewer to meet.
    """
    rows = [
        m
        for k, c in cases.items()
        if k != "d_train"
        for m in c["methods"].values()
        if m["verdict"] is not None
    ]
    counts = {
        v: sum(m["verdict"] == v for m in rows) for v in ("pass", "fail", "noise")
    }
    counts["error"] = sum(m["error"] is not None for m in rows)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="abcd")
    add_malloc_option(parser)
    add_device_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = apply_malloc_option(args.malloc)
    bench_measure.set_device(args.device)
    # at least 6 rounds, --quick too: fewer give no paired 95% interval (see
    # paired_interval), and every verdict then rests on the point value alone
    budget, rounds = (3.0, (6, 10)) if args.quick else (12.0, (6, 40))
    cases = {}
    for key in args.models:
        print(f"timing model {key} ...", file=sys.stderr)
        cases[key] = bench_case(key, budget, rounds)
    if "d" in args.models:
        print("timing model d in train mode ...", file=sys.stderr)
        # the same rounds as the other cases: at least 6, or there is no paired
        # 95% interval and a verdict would rest on the point value alone
        cases["d_train"] = bench_case(
            "d", budget, rounds, train=True, only=("gc_projection_1", "spectral_norm")
        )
    result = {
        "benchmark": "regularized training step ÷ plain training step",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpu": cpu_model()},
        "device": str(bench_measure.DEVICE),
        "device_name": bench_measure.device_name(),
        "allocator": allocator,
        "quick": args.quick,
        "cases": cases,
        "floor_verdicts": floor_verdicts(cases),
    }
    write_text(args.out, json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
