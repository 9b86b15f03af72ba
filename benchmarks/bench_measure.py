"""Ratio benchmark: the cost of measuring geometric complexity, against training.

Run it with ``make bench``, i.e. ``.venv/bin/python benchmarks/bench_measure.py``
(``--quick`` for fewer repeats while developing, ``--out PATH`` to write the JSON
elsewhere, ``--threads N`` to change the default of 2 torch threads,
``--malloc default`` to keep glibc's own allocator settings instead of
:func:`geocomplexity.malloc.tune_malloc`; ``make bench`` runs both).

What is measured, per model, in one process (float32, default PyTorch init,
random N(0, 1) inputs and random labels, every model in eval mode):

- ``fwd+bwd``: one cross-entropy forward and backward w.r.t. the parameters,
  gradients zeroed each time; the unit every cost is expressed in.
- ``forward``: a plain forward with grad enabled; ``(1+k) × forward`` is the
  bar that an exact method (one forward, k VJPs each costing about one forward)
  should reach.
- ``exact``: ``geocomplexity.geometric_complexity(method="exact")`` with the
  default chunking, and with ``chunk_size=1`` (a loop of k VJPs) and
  ``chunk_size=k`` (all k VJPs in one batched backward).
- ``projection`` and ``jvp`` with one probe.
- ``vmap(jacrev)``: the per-sample reference via ``torch.func.functional_call``.
- ``naive loop``: ``torch.autograd.functional.jacobian`` sample by sample, timed
  on a few samples and scaled to the batch.

Each method gets two warm-up calls, then repeats are interleaved (one call of
every method per round, in a fresh seeded random order each round) so that drift
(thermal, other processes) hits all methods alike and no method always runs
right after the same one; the median is reported. Rounds continue
until a per-model time budget runs out, between a minimum and maximum count.

Also measured: the exact data-set GC of MNIST-1D's 4000 training points with
model (a) against one training epoch (8 steps of batch 512); exact GC where the
input is smaller than the output (model (e), 32 inputs, 784 outputs: forward
mode) against ``vmap(jacfwd)`` and (1+d) forwards; and the peak memory of exact
GC on the CNN for chunk sizes 1, 2 and 10, each in a fresh subprocess.

Results go to ``benchmarks/results/measure.json``; a markdown table for the
README is printed to stdout. This is a benchmark, never a test: the floors
below are recorded as pass/fail, and the exit status does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc as gc_module
import itertools
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import geocomplexity
from geocomplexity import malloc, tuning
from geocomplexity.atomic import write_text
from geocomplexity.models import PreActResNet18

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "measure.json"

#: Floors from the issue: (name, description). Checked in :func:`check_floors`.
FLOOR_EXACT_VS_BAR = 1.15  # exact ≤ this × (1+k) forwards
FLOOR_EXACT_VS_STEP = 4.0  # exact ≤ this × fwd+bwd, on the k=10 models (a)-(c)
FLOOR_PROJECTION_VS_STEP = 0.8  # 1-probe projection ≤ this × fwd+bwd
# the bare-autograd reference of each floored method
BARE = {
    "exact": "bare autograd: loop of k VJPs",
    "projection, 1 probe": "bare autograd: projection",
}

MEMORY_CHUNKS = (1, 2, 10)


# --------------------------------------------------------------------------- models


def mlp(widths: list[int]) -> nn.Sequential:
    """A ReLU MLP with the given layer widths (input first, output last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn() -> nn.Sequential:
    """Three conv-ReLU-maxpool stages (32, 64, 128 channels) and a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 10),
    )  # fmt: skip


@dataclass
class Case:
    """One model with its batch."""

    key: str
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    k: int  # number of outputs
    step_floor: bool  # whether the exact ≤ 4× fwd+bwd floor applies


#: Where the cases run; ``main`` sets it from ``--device`` (a GPU session runs the
#: same benchmark with ``--device cuda``).
DEVICE = torch.device("cpu")


def set_device(name: str) -> torch.device:
    """Run the cases on ``name`` ("cpu" or "cuda"); returns the device."""
    global DEVICE
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    DEVICE = torch.device(name)
    return DEVICE


def sync() -> None:
    """Wait for queued GPU work, so a timer reads finished work only."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def make_case(key: str, seed: int = 0) -> Case:
    """Build model ``key`` ("a".."d") and its random batch, deterministically."""
    torch.manual_seed(seed)
    if key == "a":
        name, shape, B = "(a) MLP 40-256-256-10", (40,), 512
        model = mlp([40, 256, 256, 10])
    elif key == "b":
        name, shape, B = "(b) MLP 784-512×3-10", (784,), 256
        model = mlp([784, 512, 512, 512, 10])
    elif key == "c":
        name, shape, B = "(c) CNN 32-64-128", (3, 32, 32), 128
        model = cnn()
    elif key == "d":
        name, shape, B = "(d) PreAct ResNet-18 k=8", (3, 32, 32), 32
        model = PreActResNet18(k=8)
    else:
        raise ValueError(f"unknown model {key!r}")
    # eval mode for every model: GC is measured in eval mode, and the baseline
    # step runs the same graph so the ratios compare like with like
    model.eval()
    x = torch.randn(B, *shape)
    y = torch.randint(0, 10, (B,))
    # drawn on the CPU, then moved: the same numbers on every device
    model, x, y = model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    return Case(key, name, model, x, y, 10, key in "abc")


# -------------------------------------------------------------------------- methods


def step_fn(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """One training step's forward and backward (no optimizer update)."""

    def run() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return run


def forward_fn(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """A plain forward with grad enabled: it records the graph, as GC's does."""

    def run() -> None:
        with torch.enable_grad():
            model(x)

    return run


def vmap_jacrev_sq_norms(
    model: nn.Module, x: Tensor, jacobian: Callable[..., Any] = torch.func.jacrev
) -> Tensor:
    """Per-sample ‖J‖_F² via ``vmap(jacrev(f))`` over ``functional_call``.

    Parameters are detached: the outer autograd then records nothing, the
    reference's most favourable setting. ``jacobian=torch.func.jacfwd`` gives
    the forward-mode reference.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(xi: Tensor) -> Tensor:
        out = torch.func.functional_call(model, (params, buffers), (xi.unsqueeze(0),))
        return out.squeeze(0)

    jac = torch.func.vmap(jacobian(f))(x)
    return jac.reshape(x.shape[0], -1).pow(2).sum(1)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def rademacher(like: Tensor, generator: torch.Generator) -> Tensor:
    """±1 entries shaped like ``like``, drawn with plain torch ops."""
    v = torch.randint(
        0, 2, like.shape, generator=generator, dtype=like.dtype, device=like.device
    )
    return v.mul_(2).sub_(1)


def bare_projection(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    """The least a 1-probe projection can do with autograd: no checks at all.

    Parameters frozen, one forward, one Rademacher VJP to the input, its squared
    norm. A floor this reference misses is out of reach of PyTorch autograd on
    the machine, not only of this library.
    """
    g = torch.Generator(device=x.device).manual_seed(0)

    def run() -> Tensor:
        with _frozen(model), torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = model(xg)
            (gx,) = torch.autograd.grad(out, xg, rademacher(out, g))
            return gx.pow(2).sum() / x.shape[0]

    return run


def bare_exact(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    """The plain loop of k VJPs (the issue's "loop over outputs"), frozen weights."""

    def run() -> Tensor:
        with _frozen(model), torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = model(xg).flatten(1)
            k = out.shape[1]
            total = x.new_zeros(())
            for j in range(k):
                e = torch.zeros_like(out)
                e[:, j] = 1
                (gx,) = torch.autograd.grad(out, xg, e, retain_graph=j < k - 1)
                total = total + gx.pow(2).sum()
            return total / x.shape[0]

    return run


def naive_sq_norms(model: nn.Module, x: Tensor) -> Tensor:
    """Per-sample ‖J‖_F², one ``autograd.functional.jacobian`` call per sample."""
    vals = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(
            lambda z: model(z.unsqueeze(0)).squeeze(0), xi
        )
        vals.append(jac.pow(2).sum())
    return torch.stack(vals)


def gc(model: nn.Module, x: Tensor, **kw: Any) -> Callable[[], None]:
    """A timed call of ``geocomplexity.geometric_complexity``."""

    def run() -> None:
        geocomplexity.geometric_complexity(model, x, **kw)

    return run


# --------------------------------------------------------------------------- timing


@dataclass
class Timed:
    """A method under timing: its callable, samples and how to scale them."""

    fn: Callable[[], Any]
    scale: float = 1.0  # multiply each sample (the naive loop times a subset)
    note: str = ""
    samples: list[float] = field(default_factory=list)  # seconds per call
    error: str | None = None
    calls: int = 1  # calls per sample, set by time_interleaved's calibration

    @property
    def median_ms(self) -> float | None:
        if not self.samples:
            return None
        return statistics.median(self.samples) * 1e3 * self.scale

    @property
    def min_ms(self) -> float | None:
        """The fastest repeat: a noise-free lower bound on a shared machine."""
        return min(self.samples) * 1e3 * self.scale if self.samples else None

    @property
    def iqr_pct(self) -> float | None:
        """Interquartile range as a percentage of the median: the noise level."""
        if len(self.samples) < 4:
            return None
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return 100 * (q3 - q1) / statistics.median(self.samples)


def paired_interval(a: Timed, b: Timed, b_factor: float = 1.0) -> list[float] | None:
    """``[median, low, high]`` of the per-round ratios ``a / (b_factor·b)``.

    ``low``–``high`` is a 95% interval for that median.

    Rounds are interleaved, so round i of ``a`` and of ``b`` ran side by side
    and their ratio cancels the drift both saw. The interval is the
    distribution-free one from exact binomial order statistics: no assumption
    on the shape of the noise. ``None`` with fewer than 6 paired rounds.
    """
    n = min(len(a.samples), len(b.samples))
    if n < 6:
        return None
    r = sorted(
        (x * a.scale) / (y * b.scale * b_factor)
        for x, y in zip(a.samples[:n], b.samples[:n], strict=True)
    )
    # exact order statistics: the largest j with P(Bin(n, 1/2) < j) <= 2.5%
    # gives [r_(j), r_(n+1-j)] (1-based), at least 95% coverage for any n
    j, below = 1, 0.0
    while True:
        below += math.comb(n, j - 1) / 2**n  # now P(Bin < j)
        if below > 0.025:
            break
        j += 1
    j = max(1, j - 1)
    lo, hi = j - 1, n - j
    return [statistics.median(r), r[lo], r[hi]]


def verdict(value: float | None, interval: list[float] | None, limit: float) -> str:
    """``"pass"``/``"fail"`` when the interval clears the limit, else ``"noise"``.

    Without an interval the point value decides.
    """
    if value is None:
        return "n/a"
    if interval is None:
        return "pass" if value <= limit else "fail"
    if interval[2] <= limit:
        return "pass"
    if interval[1] > limit:
        return "fail"
    return "noise"


def time_interleaved(
    methods: dict[str, Timed],
    budget_s: float,
    min_rounds: int,
    max_rounds: int,
    min_sample_s: float = 0.05,
) -> int:
    """Warm up every method twice, then run interleaved rounds until the budget.

    A method faster than ``min_sample_s`` is called several times back to back
    per sample (timeit's autorange): millisecond calls are otherwise dominated by
    scheduler and timer jitter. A method that raises, in its warm-up or in a
    later round (a GPU out of memory after another method's cache), is
    recorded with its error string and dropped, its samples with it; the
    others go on, so one failure loses no other method's timings.

    Returns:
        The number of timed rounds.
    """
    for m in methods.values():
        try:
            for _ in range(2):
                m.fn()
            sync()
            t0 = time.perf_counter()
            m.fn()
            sync()
            once = time.perf_counter() - t0
        except Exception as err:  # the reference may fail; record why
            m.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            continue
        m.calls = max(1, min(50, round(min_sample_s / max(once, 1e-6))))
    live = [name for name, m in methods.items() if m.error is None]
    # a fresh random order each round, seeded so runs are comparable: a rotation
    # keeps every method behind the same (memory-heavy, cache-evicting)
    # predecessor in all rounds but one, which would bias the paired ratios
    order_rng = random.Random(0)
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (
        rounds < min_rounds or time.perf_counter() - start < budget_s
    ):
        order = live[:]
        order_rng.shuffle(order)
        for name in order:
            m = methods[name]
            try:
                sync()
                t0 = time.perf_counter()
                for _ in range(m.calls):
                    m.fn()
                sync()
            except Exception as err:
                m.error = f"round {rounds + 1}: {type(err).__name__}: {err}"
                m.error = m.error.splitlines()[0][:300]
                m.samples.clear()  # its rounds would pair with no others
                live.remove(name)
                continue
            m.samples.append((time.perf_counter() - t0) / m.calls)
        rounds += 1
    return rounds


#: Relative error above which a correctness check is flagged (float32; loose
#: enough for TF32 convolutions on a GPU, far below what a wrong path gives).
CHECK_TOL = 1e-2


def rel_err(value: Tensor, ref: Tensor) -> float:
    """``|value - ref| / |ref|`` of two scalars, as a float."""
    return ((value.detach() - ref.detach()).abs() / ref.detach().abs()).item()


def warn_check(name: str, check: dict[str, float]) -> None:
    """Warn on stderr about every check beyond :data:`CHECK_TOL`."""
    for what, err in check.items():
        if not err <= CHECK_TOL:  # NaN too
            print(f"warning: {name}: {what} = {err:.3g}: the timed paths disagree",
                  file=sys.stderr)  # fmt: skip


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` if either is missing."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# --------------------------------------------------------------------- per model


def bench_model(case: Case, budget_s: float, min_rounds: int, max_rounds: int,
                naive_samples: int) -> dict[str, Any]:  # fmt: skip
    """Time every method on one model and return its JSON record."""
    model, x, y, k = case.model, case.x, case.y, case.k
    B = x.shape[0]
    n_naive = min(B, naive_samples)
    x_naive = x[:n_naive]
    methods: dict[str, Timed] = {
        "fwd+bwd": Timed(step_fn(model, x, y)),
        "forward": Timed(forward_fn(model, x)),
        "exact (default chunk)": Timed(gc(model, x, method="exact")),
        "exact chunk_size=1": Timed(gc(model, x, method="exact", chunk_size=1)),
        f"exact chunk_size={k}": Timed(gc(model, x, method="exact", chunk_size=k)),
        "projection, 1 probe": Timed(gc(model, x, method="projection", num_probes=1)),
        "bare autograd: projection": Timed(bare_projection(model, x)),
        "bare autograd: loop of k VJPs": Timed(bare_exact(model, x)),
        "jvp, 1 probe": Timed(gc(model, x, method="jvp", num_probes=1)),
        "vmap(jacrev)": Timed(lambda: vmap_jacrev_sq_norms(model, x)),
        "naive loop": Timed(
            lambda: naive_sq_norms(model, x_naive),
            scale=B / n_naive,
            note=f"timed on {n_naive} of {B} samples, scaled ×{B / n_naive:g}",
        ),
    }
    load_start = os.getloadavg()[0]
    # the default chunk is chosen by timing its first calls (geocomplexity.tuning):
    # those calls come first, so that every timed call runs the chosen one
    for _ in range(tuning.MAX_TIMED_CALLS):
        methods["exact (default chunk)"].fn()
    rounds = time_interleaved(methods, budget_s, min_rounds, max_rounds)
    load_end = os.getloadavg()[0]

    # correctness: the timed methods must agree, or the timings mean nothing
    exact = geocomplexity.jacobian_sq_norms(model, x, method="exact")
    check: dict[str, Any] = {}
    if methods["vmap(jacrev)"].error is None:
        ref = vmap_jacrev_sq_norms(model, x)
        check["max_rel_err_exact_vs_vmap"] = ((exact - ref).abs() / ref).max().item()
    ref_naive = naive_sq_norms(model, x_naive)
    rel = (exact[:n_naive] - ref_naive).abs() / ref_naive
    check["max_rel_err_exact_vs_naive"] = rel.max().item()
    # the other timed exact paths (both chunk sizes, the bare loop) must give the
    # same GC too: a fast but wrong path would otherwise look good
    gc_exact = exact.mean()
    for c in (1, k):
        v = geocomplexity.geometric_complexity(model, x, method="exact", chunk_size=c)
        check[f"rel_err_exact_chunk_size={c}"] = rel_err(v, gc_exact)
    if methods[BARE["exact"]].error is None:
        check["rel_err_bare_loop_of_k_vjps"] = rel_err(bare_exact(model, x)(), gc_exact)
    warn_check(case.name, check)

    fwd_bwd = methods["fwd+bwd"].median_ms
    forward = methods["forward"].median_ms
    bar = None if forward is None else (1 + k) * forward
    vmap = methods["vmap(jacrev)"].median_ms
    rows: dict[str, Any] = {}
    bases = {
        "x_fwd_bwd": (methods["fwd+bwd"], 1.0),
        "x_vmap_jacrev": (methods["vmap(jacrev)"], 1.0),
        "x_1pk_forwards": (methods["forward"], 1.0 + k),
    }
    for name, m in methods.items():
        med = m.median_ms
        ci = {f: paired_interval(m, base, fac) for f, (base, fac) in bases.items()}
        rows[name] = {
            "median_ms": med,
            "min_ms": m.min_ms,
            "repeats": len(m.samples),
            "calls_per_repeat": m.calls,
            "iqr_pct": m.iqr_pct,
            "x_fwd_bwd": ratio(med, fwd_bwd),
            "x_vmap_jacrev": ratio(med, vmap),
            "x_1pk_forwards": ratio(med, bar),
            # [median, 95% low, 95% high] of the per-round paired ratios
            "paired": ci,
        }
        if m.note:
            rows[name]["note"] = m.note
        if m.error:
            rows[name]["error"] = m.error
    # what the default ran: the rule's chunk, or the loop where it was faster
    default_chunk = geocomplexity.jacobian._default_chunk(model, k, x, k)
    chosen = set(tuning.decisions(model).values())
    default_chunk = chosen.pop() if len(chosen) == 1 else default_chunk
    chunks = {c: rows[f"exact chunk_size={c}"]["median_ms"] for c in (1, k)}
    return {
        "name": case.name,
        "batch": B,
        "input_shape": list(x.shape[1:]),
        "outputs_k": k,
        "parameters": sum(p.numel() for p in model.parameters()),
        "mode": "eval",
        "rounds": rounds,
        # 1-minute load average around the timing: above the thread count, other
        # processes competed for the cores and the timings are inflated
        "loadavg_1min": [load_start, load_end],
        "one_plus_k_forwards_ms": bar,
        "default_chunk_size": default_chunk,
        "fastest_chunk_size": min(chunks, key=lambda c: chunks[c]),
        "methods": rows,
        "check": check,
    }


# ------------------------------------------------------------------------ MNIST-1D


def mnist1d_train() -> Tensor:
    """MNIST-1D's 4000 training inputs, generated offline.

    ``make_dataset`` reseeds numpy's and python's global RNGs; they are restored
    so the benchmark's own randomness does not depend on whether this ran.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return torch.as_tensor(data["x"], dtype=torch.float32)


def bench_mnist1d(budget_s: float, min_rounds: int, max_rounds: int) -> dict[str, Any]:
    """Exact data-set GC of model (a) on MNIST-1D vs one epoch of training steps."""
    case = make_case("a")
    model = case.model
    try:
        x_train = mnist1d_train()
    except ImportError as err:
        # mnist1d imports requests and matplotlib.pyplot at import time: a
        # machine without them (a GPU one, given mnist1d alone by gpu_check.sh
        # prepare) loses this stage, not the models timed before it
        reason = f"mnist1d does not import ({type(err).__name__}: {err})"
        print(f"warning: MNIST-1D stage skipped: {reason}", file=sys.stderr)
        return {"model": case.name, "skipped": reason}
    torch.manual_seed(1)
    y_train = torch.randint(0, 10, (len(x_train),))
    x_train, y_train = x_train.to(DEVICE), y_train.to(DEVICE)
    bs = 512
    steps = list(zip(x_train.split(bs), y_train.split(bs), strict=True))

    def epoch() -> None:
        for xb, yb in steps:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()

    def measure() -> None:
        geocomplexity.measure(
            model, x_train, method="exact", batch_size=bs, progress=False
        )

    methods = {"epoch fwd+bwd": Timed(epoch), "measure exact": Timed(measure)}
    # both batch shapes (512 and the last, 416) decide their chunk before the
    # timing (geocomplexity.tuning): enough batches of each shape to settle
    for _ in range(tuning.MAX_TIMED_CALLS):
        measure()
    rounds = time_interleaved(methods, budget_s, min_rounds, max_rounds)
    ep, gc_ms = methods["epoch fwd+bwd"].median_ms, methods["measure exact"].median_ms
    return {
        "model": case.name,
        "num_samples": len(x_train),
        "batch_size": bs,
        "steps_per_epoch": len(steps),
        "rounds": rounds,
        "epoch_fwd_bwd_ms": ep,
        "measure_exact_ms": gc_ms,
        "x_epoch": ratio(gc_ms, ep),
        "note": "epoch = 8 fwd+bwd steps over the same 4000 points (last batch 416)",
    }


# ------------------------------------------------------------------ d < k (e)


def vmap_jacfwd_sq_norms(model: nn.Module, x: Tensor) -> Tensor:
    """Per-sample ‖J‖_F² via ``vmap(jacfwd(f))`` (forward mode), detached weights."""
    return vmap_jacrev_sq_norms(model, x, torch.func.jacfwd)


def bench_wide_output(
    budget_s: float, min_rounds: int, max_rounds: int
) -> dict[str, Any]:
    """Exact GC where the input is smaller than the output: forward mode.

    A decoder-shaped MLP 32-256-256-784 (d = 32 inputs, k = 784 outputs, batch
    256): exact takes d JVPs, batched (``vmap`` over ``torch.func.jvp``, the
    primal once a pass), against ``chunk_size=1`` (one dual pass a direction,
    each rerunning the primal), ``vmap(jacfwd)`` and ``vmap(jacrev)``, and the
    bar of (1+d) forwards.
    """
    torch.manual_seed(0)
    model = mlp([32, 256, 256, 784]).eval().to(DEVICE)
    x = torch.randn(256, 32).to(DEVICE)
    d = x.shape[1]
    methods = {
        "forward": Timed(forward_fn(model, x)),
        "exact (default chunk)": Timed(gc(model, x, method="exact")),
        "exact chunk_size=1": Timed(gc(model, x, method="exact", chunk_size=1)),
        "vmap(jacfwd)": Timed(lambda: vmap_jacfwd_sq_norms(model, x)),
        "vmap(jacrev)": Timed(lambda: vmap_jacrev_sq_norms(model, x)),
    }
    rounds = time_interleaved(methods, budget_s, min_rounds, max_rounds)
    exact = geocomplexity.geometric_complexity(model, x, method="exact")
    check = {
        "rel_err_exact_vs_vmap_jacfwd": rel_err(
            vmap_jacfwd_sq_norms(model, x).mean(), exact
        ),
        "rel_err_exact_chunk_size=1": rel_err(
            geocomplexity.geometric_complexity(model, x, chunk_size=1), exact
        ),
    }
    warn_check("(e) d < k", check)
    forward = methods["forward"]
    bases = {
        "x_1pd_forwards": (forward, 1.0 + d),
        "x_vmap_jacfwd": (methods["vmap(jacfwd)"], 1.0),
    }
    rows = {}
    for name, m in methods.items():
        rows[name] = {
            "median_ms": m.median_ms,
            "repeats": len(m.samples),
            "iqr_pct": m.iqr_pct,
            "x_1pd_forwards": ratio(
                m.median_ms,
                None if forward.median_ms is None else (1 + d) * forward.median_ms,
            ),
            "x_vmap_jacfwd": ratio(m.median_ms, methods["vmap(jacfwd)"].median_ms),
            "paired": {f: paired_interval(m, b, fac) for f, (b, fac) in bases.items()},
        }
        if m.error:
            rows[name]["error"] = m.error
    return {
        "name": "(e) MLP 32-256-256-784, d=32 < k=784",
        "batch": len(x),
        "inputs_d": d,
        "outputs_k": 784,
        "default_chunk_size": geocomplexity.jacobian._default_chunk(
            model, d, x, 784, backward=False
        ),
        "rounds": rounds,
        "methods": rows,
        "check": check,
    }


# -------------------------------------------------------------------- peak memory


def _proc_status_mib(field: str) -> float | None:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/self/status`` in MiB (Linux only)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the file says kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_child(chunk: int) -> dict[str, Any]:
    """In a fresh process: the peak RSS of one exact GC call on the CNN.

    A full-batch forward first brings the allocator to a forward's footprint, and
    a one-sample GC call pages in the backward kernels' code, so that neither is
    charged to the call. ``ru_maxrss`` is no use here: Linux carries it over from
    the parent across fork and exec, so a child of a big parent reports the
    parent's peak. The per-process ``VmHWM`` is reset just before the call
    instead, and the extra peak is ``VmHWM`` after minus ``VmRSS`` before.
    """
    case = make_case("c")
    model, x = case.model, case.x
    with torch.enable_grad():
        model(x)
    geocomplexity.geometric_complexity(model, x[:1], method="exact", chunk_size=chunk)
    gc_module.collect()
    if _reset_peak_rss() and (before := _proc_status_mib("VmRSS")) is not None:
        how = "VmHWM after (reset just before) minus VmRSS before"
    else:  # no /proc: ru_maxrss, which still counts the warm-up forward's peak
        how = "ru_maxrss after minus before (includes the warm-up's peak)"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    geocomplexity.geometric_complexity(model, x, method="exact", chunk_size=chunk)
    peak = _proc_status_mib("VmHWM")
    if peak is None or how.startswith("ru_maxrss"):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    return {"chunk_size": chunk, "rss_before_mib": before, "peak_rss_mib": peak,
            "extra_peak_mib": peak - before, "how": how}  # fmt: skip


def bench_peak_memory(threads: int) -> dict[str, Any]:
    """Run :func:`peak_memory_child` in a fresh subprocess per chunk size.

    On a GPU: the CUDA allocator's peak during the call instead, in-process.
    """
    if DEVICE.type == "cuda":
        return cuda_peak_memory()
    rows = []
    for chunk in MEMORY_CHUNKS:
        args = ["--threads", str(threads), "--_peak-mem", str(chunk)]
        # glibc's own settings always: tuned, the warm-up's freed memory stays
        # mapped and shifts what "before" means; this keeps runs comparable
        args += ["--malloc", "default"]
        cmd = [sys.executable, __file__, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return {
        "model": make_case("c").name,
        "batch": 128,
        "how": "fresh subprocess each (glibc's default malloc settings), after a "
        "full-batch forward and a one-sample GC call (allocator and code warm); "
        "peak RSS during the call minus RSS just before it",
        "rows": rows,
    }


def cuda_peak_memory() -> dict[str, Any]:
    """Peak CUDA memory of one exact GC call on the CNN, per chunk size."""
    case = make_case("c")
    model, x = case.model, case.x
    rows = []
    for chunk in MEMORY_CHUNKS:
        geocomplexity.geometric_complexity(model, x, method="exact", chunk_size=chunk)
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE) / 2**20
        geocomplexity.geometric_complexity(model, x, method="exact", chunk_size=chunk)
        sync()
        peak = torch.cuda.max_memory_allocated(DEVICE) / 2**20
        rows.append(
            {
                "chunk_size": chunk,
                "rss_before_mib": before,
                "peak_rss_mib": peak,
                "extra_peak_mib": peak - before,
                "how": "CUDA max_memory_allocated minus allocated before",
            }
        )
    return {
        "model": case.name,
        "batch": len(x),
        "how": "CUDA caching allocator, in-process, after a warm-up call",
        "rows": rows,
    }


# ---------------------------------------------------------------------------- meta


def add_malloc_option(parser: argparse.ArgumentParser) -> None:
    """The ``--malloc`` option both benchmarks share."""
    parser.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned: geocomplexity.malloc.tune_malloc() (freed memory is reused, "
        "not page-faulted back in); default: glibc's own settings",
    )


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` option both benchmarks share."""
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the models run (cuda: timings synchronise the GPU)",
    )


def device_name() -> str:
    """The processor the cases run on, for the JSON and the tables."""
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return cpu_model()


def apply_malloc_option(setting: str) -> str:
    """Apply ``--malloc`` and describe the allocator for the JSON."""
    if setting == "tuned" and malloc.tune_malloc():
        mmap, trim = malloc.tuned() or (0, 0)
        return f"glibc tuned: mmap threshold {mmap >> 20} MiB, trim {trim >> 20} MiB"
    if setting == "tuned":
        return "system default (no glibc to tune)"
    return "glibc default" if malloc.is_glibc() else "system default"


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -------------------------------------------------------------------------- floors


def check_floors(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's floors, per model, with the measured ratio and pass/fail.

    Exact floors use the default chunking (what users get), and are repeated
    with the faster of ``chunk_size`` 1 and k, to show whether a better default
    would pass where the current one fails.
    """
    floors = []
    for key, rec in models.items():
        m = rec["methods"]
        best = m[f"exact chunk_size={rec['fastest_chunk_size']}"]
        # (floor, method row, ratio field, limit); the bare-autograd reference of
        # each row shows whether the floor is reachable on this machine at all
        items = [
            ("exact ≤ vmap(jacrev)", "exact", "x_vmap_jacrev", 1.0),
            (f"exact ≤ {FLOOR_EXACT_VS_BAR}× (1+k) forwards", "exact",
             "x_1pk_forwards", FLOOR_EXACT_VS_BAR),
            (f"projection ≤ {FLOOR_PROJECTION_VS_STEP}× fwd+bwd",
             "projection, 1 probe", "x_fwd_bwd", FLOOR_PROJECTION_VS_STEP),
        ]  # fmt: skip
        if rec["outputs_k"] == 10 and key in "abc":
            items.append((f"exact ≤ {FLOOR_EXACT_VS_STEP}× fwd+bwd", "exact",
                          "x_fwd_bwd", FLOOR_EXACT_VS_STEP))  # fmt: skip
        for name, method, ratio_field, limit in items:
            # floors are judged on the median of paired per-round ratios, which
            # cancels drift that a ratio of two medians keeps
            main = m["exact (default chunk)" if method == "exact" else method]
            ci = main["paired"][ratio_field]
            value = main[ratio_field] if ci is None else ci[0]
            bare_row = m[BARE[method]]
            bare_ci = bare_row["paired"][ratio_field]
            bare = bare_row[ratio_field] if bare_ci is None else bare_ci[0]
            row = {
                "model": rec["name"], "floor": name, "value": value, "limit": limit,
                "pass": None if value is None else bool(value <= limit),
                "paired": ci, "verdict": verdict(value, ci, limit),
                "bare_autograd": bare,
                "bare_passes": None if bare is None else bool(bare <= limit),
                "bare_paired": bare_ci, "bare_verdict": verdict(bare, bare_ci, limit),
            }  # fmt: skip
            if method == "exact":
                # the same statistic as ``value``: the paired median where it exists
                best_ci = best["paired"][ratio_field]
                v = best[ratio_field] if best_ci is None else best_ci[0]
                row["value_fastest_chunk"] = v
                row["pass_fastest_chunk"] = None if v is None else bool(v <= limit)
            floors.append(row)
    return floors


# ------------------------------------------------------------------------ printing


def fmt(v: float | None, digits: int = 2) -> str:
    """A number for the table, or an em dash if missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The README tables."""
    meta = result["meta"]
    lines = [
        (
            f"Geometric-complexity cost on CPU ({meta['threads']} threads, torch "
            f"{meta['torch']}, {meta['processor']}); median ms, "
            if meta.get("device", "cpu") == "cpu"
            else f"Geometric-complexity cost on {meta['device_name']} (torch "
            f"{meta['torch']}); median ms, "
        )
        + "ratios to one fwd+bwd step, to `vmap(jacrev)` and to (1+k) forwards, k=10.",
        "",
        "| model | method | ms | × fwd+bwd | × vmap(jacrev) | × (1+k) fwd |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for rec in result["models"].values():
        for name, row in rec["methods"].items():
            label = name
            if name == "exact (default chunk)":
                label = f"exact (default chunk={rec['default_chunk_size']})"
            if "error" in row:
                label += " (error)"
            if "note" in row:
                label += " ¹"
            model = f"{rec['name']} (B={rec['batch']})"
            lines.append(
                f"| {model} | {label} | {fmt(row['median_ms'], 1)} "
                f"| {fmt(row['x_fwd_bwd'])} | {fmt(row['x_vmap_jacrev'])} "
                f"| {fmt(row['x_1pk_forwards'])} |"
            )
    lines += ["", "¹ timed on a few samples, scaled to the batch."]
    errors = [
        f"- {rec['name']} {name}: `{row['error']}`"
        for rec in result["models"].values()
        for name, row in rec["methods"].items()
        if "error" in row
    ]
    if errors:
        lines += ["", "Errors:", *errors]
    mn = result["mnist1d"]
    lines += [
        "",
        f"Exact data-set GC, MNIST-1D train: skipped, {mn['skipped']}."
        if "skipped" in mn
        else f"Exact data-set GC, MNIST-1D train ({mn['num_samples']} points, "
        f"{mn['model']}): {fmt(mn['measure_exact_ms'], 1)} ms = "
        f"{fmt(mn['x_epoch'])}× one epoch of {mn['steps_per_epoch']} fwd+bwd "
        f"steps ({fmt(mn['epoch_fwd_bwd_ms'], 1)} ms).",
        "",
        "Fastest exact chunk_size: "
        + ", ".join(
            f"{rec['name'].split()[0]} {rec['fastest_chunk_size']}"
            for rec in result["models"].values()
        )
        + ".",
        "",
        "| floor | model | value | 95% interval ² | limit | verdict ³ "
        "| fastest chunk | bare autograd ⁴ | verdict |",
        "|---|---|---:|---|---:|---|---:|---:|---|",
    ]

    def shown(v: str) -> str:
        return {"pass": "yes", "fail": "**no**"}.get(v, v)

    def interval(ci: list[float] | None) -> str:
        return "—" if ci is None else f"{ci[1]:.2f}–{ci[2]:.2f}"

    for f in result["floors"]:
        lines.append(
            f"| {f['floor']} | {f['model']} | {fmt(f['value'])} "
            f"| {interval(f.get('paired'))} | {f['limit']} | {shown(f['verdict'])} "
            f"| {fmt(f.get('value_fastest_chunk'))} | {fmt(f.get('bare_autograd'))} "
            f"| {shown(f['bare_verdict'])} |"
        )
    lines += [
        "",
        "² value and its 95% interval: the median of the per-round ratios (rounds "
        "are interleaved, so each ratio pairs calls that ran side by side; the "
        "table above divides medians instead, so the two can differ a little).",
        "³ yes / **no** when the interval clears the limit; noise when the limit "
        "lies inside it.",
        "⁴ the same ratio for the bare-autograd reference timed in the same process "
        "(a loop of k `autograd.grad` calls for exact, one Rademacher VJP for "
        "projection; weights frozen, no checks, nothing restored): where it misses "
        "the floor too, PyTorch autograd cannot reach it on this machine.",
    ]
    wide = result.get("wide_output")
    if wide:
        lines += [
            "",
            f"Exact GC where d < k, {wide['name']} (B={wide['batch']}): forward "
            f"mode, d JVPs (default chunk={wide['default_chunk_size']}); median ms, "
            "ratios to (1+d) forwards and to `vmap(jacfwd)`.",
            "",
            "| method | ms | × (1+d) fwd | × vmap(jacfwd) |",
            "|---|---:|---:|---:|",
        ]
        for name, row in wide["methods"].items():
            label = name + (" (error)" if "error" in row else "")
            lines.append(
                f"| {label} | {fmt(row['median_ms'], 1)} "
                f"| {fmt(row['x_1pd_forwards'])} | {fmt(row['x_vmap_jacfwd'])} |"
            )
    mem = result.get("peak_memory")
    if mem:
        cuda = meta.get("device", "cpu") != "cpu"
        how = (
            "CUDA allocator's peak during the call minus what was allocated "
            "before it, in-process after a warm-up call"
            if cuda
            else "peak RSS during the call minus RSS before it, fresh warmed-up "
            "process each"
        )
        peak = "peak allocated MiB" if cuda else "peak RSS MiB"
        lines += [
            "",
            f"Peak memory of exact GC, {mem['model']} B={mem['batch']} ({how}):",
            "",
            f"| chunk_size | extra peak MiB | {peak} |",
            "|---:|---:|---:|",
        ]
        for r in mem["rows"]:
            lines.append(
                f"| {r['chunk_size']} | {fmt(r['extra_peak_mib'], 1)} "
                f"| {fmt(r['peak_rss_mib'], 1)} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, write JSON and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (development)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--models", default="abcd", help="subset of models, e.g. 'ac'")
    p.add_argument("--_peak-mem", dest="peak_mem", type=int, help=argparse.SUPPRESS)
    add_malloc_option(p)
    add_device_option(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = apply_malloc_option(args.malloc)
    set_device(args.device)

    if args.peak_mem is not None:  # the subprocess of bench_peak_memory
        print(json.dumps(peak_memory_child(args.peak_mem)))
        return 0

    # (budget seconds per model, min rounds, max rounds, naive-loop samples)
    # at least 6 rounds, --quick too: fewer give no paired 95% interval, and a
    # verdict read off the point value alone (bench_regularizers does the same)
    budget, lo, hi, naive = (4.0, 6, 10, 2) if args.quick else (35.0, 7, 40, 8)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    models = {}
    for key in args.models:
        case = make_case(key)
        print(f"timing {case.name} ...", file=sys.stderr, flush=True)
        models[key] = bench_model(case, budget, lo, hi, naive)
    print("timing MNIST-1D data-set GC ...", file=sys.stderr, flush=True)
    mn = bench_mnist1d(budget / 2, lo, hi)
    print("timing (e), d < k ...", file=sys.stderr, flush=True)
    wide = bench_wide_output(budget / 2, lo, hi)
    print("peak memory ...", file=sys.stderr, flush=True)
    mem = bench_peak_memory(args.threads)

    result = {
        "meta": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": cpu_model(),
            "cpu_count": os.cpu_count(),
            "dtype": "float32",
            "device": str(DEVICE),
            "device_name": device_name(),
            "allocator": allocator,
            "quick": args.quick,
            "budget_s_per_model": budget,
            "rounds_min_max": [lo, hi],
            "warmup_calls": 2,
            "statistic": "median over interleaved rounds; a repeat of a call under "
            "50 ms is the mean of back-to-back calls (calls_per_repeat)",
            "loadavg_start": load_start,
            "loadavg_end": None,
            "wall_s": None,
        },
        "models": models,
        "floors": check_floors(models),
        "mnist1d": mn,
        "wide_output": wide,
        "peak_memory": mem,
    }
    result["meta"]["wall_s"] = time.perf_counter() - t_start
    # other processes on the cores make OpenMP threads wait on each other, which
    # inflates every timing; a load above the thread count flags such a run
    result["meta"]["loadavg_end"] = load_end = os.getloadavg()
    if max(load_start[0], load_end[0]) > args.threads + 0.5:
        print(
            f"warning: load average {load_start[0]:.1f} -> {load_end[0]:.1f} exceeds "
            f"{args.threads} threads; other processes may have slowed the timings",
            file=sys.stderr,
        )
    # write then rename, so an interrupted run never leaves a truncated file
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {args.out} in {result['meta']['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
