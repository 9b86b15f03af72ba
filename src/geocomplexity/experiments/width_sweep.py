"""``double-descent`` and ``u-curve``: GC and test loss across a width sweep.

MLPs ``d → w → w → 10`` trained by full-batch Adam (lr 1e-3) long enough to
interpolate, with 15% of the training labels relabelled uniformly at random
(fixed per seed; the effective rate, below 15% because a relabelling can draw
the true class, is recorded).

- ``double-descent`` (a training subset, which sharpens the threshold): test loss
  peaks at the interpolation threshold, where train error first reaches 0
  (within one grid step of it), and descends again past it (the peak stands at
  least 10% above both ends of the sweep; no interpolating width fails the
  first claim); GC peaks at the same width (within one grid step; its peak,
  too, at least 10% above both ends: GC that only rises with width has none);
  GC and test loss move together across widths.
- ``u-curve`` (the whole training set, so the under-parameterised arm exists):
  test loss against GC is a U, a convex fit in log GC whose minimum lies inside
  the observed range, and the lowest test loss belongs to neither the lowest-
  nor the highest-GC model (an arm on each side in the data, not only in the
  fit; seed means, over the widths where every seed's net lives).

Test-error double descent is weaker than test-loss double descent at this
scale; both are shown, the claims are on the loss.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from geocomplexity.data import load
from geocomplexity.experiments.base import (
    Experiment,
    every_seed,
    result_rows,
    seed_means,
)
from geocomplexity.experiments.claims import Claim, spearman
from geocomplexity.experiments.figures import (
    closed_on_error,
    log_colorbar,
    log_xticks,
    pyplot,
    save,
)
from geocomplexity.experiments.runner import Context, Run
from geocomplexity.measure import measure
from geocomplexity.models import mlp
from geocomplexity.training import History, fit

_DD = {
    "smoke": {"widths": [2, 8, 16, 32, 64], "n": 300, "epochs": 300, "seeds": 1},
    "quick": {
        "widths": [2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128],
        "n": 1000,
        "epochs": 1500,  # keeps `reproduce all --preset quick` under 10 min
        "seeds": 3,
    },
    "paper": {
        "widths": [2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 256],
        "n": 1000,
        "epochs": 4000,
        "seeds": 5,
    },
}
_U = {
    "smoke": {"widths": [2, 8, 32, 64], "n": 600, "epochs": 300, "seeds": 1},
    "quick": {
        "widths": [2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128],
        "n": 4000,
        "epochs": 2000,
        "seeds": 1,
    },
    "paper": {
        "widths": [2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128],
        "n": 4000,
        "epochs": 3000,
        "seeds": 3,
    },
}
# what shapes every run beyond its preset; part of each run's config (and
# hash), so editing one reruns the sweep instead of reusing stale results
_FIXED = {"label_noise": 0.15, "lr": 1e-3, "gc_points": 1000}


def train_width(run: Run, device: str = "cpu") -> dict[str, Any]:
    """Train one width on a (noisy) training subset; measure loss, error and GC.

    Returns:
        Final train/test loss and error, GC on train and test points, the
        effective label-noise rate and the parameter count.
    """
    data = load(run["dataset"])
    g = torch.Generator().manual_seed(run.seed)
    n = min(run["n"], len(data.x_train))
    idx = torch.randperm(len(data.x_train), generator=g)[:n]
    x, y = data.x_train[idx], data.y_train[idx]
    w = run["width"]
    model = mlp(x.shape[1], [w, w], data.num_classes, seed=run.seed)
    history = fit(
        model,
        (x, y),
        (data.x_test, data.y_test),
        optimizer="adam",
        lr=run["lr"],
        batch_size=None,
        epochs=run["epochs"],
        label_noise=run["label_noise"],
        num_classes=data.num_classes,
        seed=run.seed,
        eval_every=run["epochs"],
        device=device,
        progress=False,
    )
    return {
        **sweep_result(
            model, history, x[: run["gc_points"]], data.x_test[: run["gc_points"]]
        ),
        "n_train": n,
    }


def sweep_result(
    model: torch.nn.Module, history: History, x_train: Tensor, x_test: Tensor
) -> dict[str, Any]:
    """What a width-sweep run reports.

    Final losses and errors, exact GC (eval mode) on the given train and test
    inputs, the effective label noise, the parameter count and the wall time.

    Returns:
        The run's result dict.
    """
    final = history.final
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "train_loss": final["train_loss"],
        "train_err": 1 - final["train_acc"],
        "test_loss": final["test_loss"],
        "test_err": 1 - final["test_acc"],
        "gc_train": measure(model, x_train, method="exact", progress=False).value,
        "gc_test": measure(model, x_test, method="exact", progress=False).value,
        "effective_noise": history.effective_label_noise,
        "seconds": final["wall_time"],
    }


def _means(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    return seed_means(rows, "width", key)


def _threshold(rows: list[dict[str, Any]]) -> int | None:
    """Index of the interpolation threshold among the sorted widths.

    The first width whose mean train error is at most 1%; ``None`` where no
    width interpolates. The claims and the figures share this definition.

    An error of exactly 1% arrives as ``1 - 0.99 = 0.010000000000000009`` (a
    run's ``1 - train_acc``), or a hair below it from a mean over seeds: the
    comparison allows 1e-9 of rounding, far below the 1/n a misclassified
    sample adds.
    """
    _, train_err = _means(rows, "train_err")
    return next((i for i, e in enumerate(train_err) if e <= 0.01 + 1e-9), None)


def _argmax(values: Sequence[float]) -> int | None:
    """Index of the largest value; ``None`` if any is NaN (``max`` skips a NaN)."""
    if not values or any(math.isnan(v) for v in values):
        return None
    return max(range(len(values)), key=values.__getitem__)


#: a peak stands at least this far above both ends of the sweep (relative)
_RISE = 0.1


def _rise(values: Sequence[float], peak: int | None) -> float:
    """How far ``values[peak]`` stands above both ends, relative to itself.

    ``min(top - first, top - last) / top``: at most 0 where the largest value is
    an end of the sweep (a curve that only rises, or only falls, has no peak);
    NaN without a peak.
    """
    if peak is None:
        return math.nan
    top = values[peak]
    return min(top - values[0], top - values[-1]) / top if top > 0 else 0.0


class _WidthSweep(Experiment):
    _presets: dict[str, dict[str, Any]]

    def runs(self, preset: str, dataset: str, seeds: int | None) -> list[Run]:
        p = self._presets[preset]
        return [
            Run.make(
                "width-sweep",
                seed,
                dataset=dataset,
                width=w,
                n=p["n"],
                epochs=p["epochs"],
                **_FIXED,
            )
            for w in p["widths"]
            for seed in range(seeds or p["seeds"])
        ]

    def execute(self, run: Run, context: Context) -> dict[str, Any]:
        return train_width(run, context.device)

    @closed_on_error
    def _plot_sweep(self, records: Sequence[dict[str, Any]], path: Path) -> Path:
        plt = pyplot()

        rows = result_rows(records)
        # the interpolation threshold, dotted, as the claims define it
        at = _threshold(rows)
        threshold = None if at is None else sorted({r["width"] for r in rows})[at]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, keys, label in (
            (axes[0], ("train_loss", "test_loss"), "cross-entropy"),
            (axes[1], ("train_err", "test_err"), "error"),
            (axes[2], ("gc_train", "gc_test"), "GC"),
        ):
            for key in keys:
                widths, mean = _means(rows, key)
                name = key.replace("_", " ").replace("gc", "GC")
                ax.plot(widths, mean, "o-", ms=3, label=name)
                ax.plot(
                    [r["width"] for r in rows],
                    [r[key] for r in rows],
                    ".",
                    color=ax.lines[-1].get_color(),
                    alpha=0.3,
                )
            if threshold is not None:
                ax.axvline(threshold, color="k", ls=":", lw=0.8)
            ax.set(xlabel="width", ylabel=label)
            log_xticks(ax, [r["width"] for r in rows], spacing=1.9)
            # a log axis needs a positive, finite value: where every run's GC
            # is NaN (all diverged), matplotlib raised "Data cannot be
            # log-scaled" after the claims were written (all 0: a warning)
            if label == "GC" and any(0 < r[k] < math.inf for r in rows for k in keys):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        noise = statistics.fmean(r["effective_noise"] for r in rows)
        # the points used: the config's n may exceed a small data set
        used = records[0]["result"].get("n_train", records[0]["config"]["n"])
        seeds = len({r["seed"] for r in rows})
        fig.suptitle(
            f"{self.name}: {used or 'all'} training points, "
            + (
                ""
                if threshold is None
                else f"interpolation threshold w={threshold} (dotted), "
            )
            + f"effective label noise {noise:.3f}; lines: mean of {seeds} "
            + ("seed" if seeds == 1 else "seeds")
            + ", dots: each run",
            fontsize=10,
        )
        return save(fig, path)


class DoubleDescent(_WidthSweep):
    """Test loss and GC peak together at the interpolation threshold."""

    name = "double-descent"
    claim = (
        "Test loss peaks at the interpolation threshold and descends again past "
        "it, GC peaks at the same width (each within one grid step), and "
        "Spearman(GC, test loss) over widths >= 0.7"
    )
    _presets = _DD

    def analyze(  # noqa: D102
        self, records: Sequence[dict[str, Any]], dataset: str
    ) -> tuple[list[Claim], list[dict[str, Any]]]:
        rows = result_rows(records)
        widths, test_loss = _means(rows, "test_loss")
        _, gc = _means(rows, "gc_train")
        n = len(rows)
        threshold = _threshold(rows)
        # a NaN mean (a diverged run) leaves no peak: the claims on it fail
        peak, gc_peak = _argmax(test_loss), _argmax(gc)
        if threshold is not None:  # none interpolates: the claim fails
            where = f"first width with mean train error <= 1%: w={widths[threshold]}"
        else:
            where = "no width reaches mean train error <= 1%"
        # a peak, not an edge of the sweep: test loss lower on both sides of it
        # (a curve that only rises, or only falls, has no double descent)
        arms = _rise(test_loss, peak)
        at = {i: f"w={widths[i]}" for i in range(len(widths))}
        if peak is None:
            loss_where = "no width: a NaN test loss"
        elif not arms > 0:
            # its largest value at an end of the sweep: no peak to place at
            # the threshold, nor for GC's to share (how far it stands above
            # the ends is the next claim's)
            loss_where = f"{at[peak]}, an end of the sweep: no peak"
            peak = None
        else:
            loss_where = at[peak]
        distance = (
            math.nan if threshold is None or peak is None else abs(peak - threshold)
        )
        # GC's largest value is a peak only where it stands above both ends, as
        # test loss must: GC that only rises with width has no peak to share
        if gc_peak is None:
            gc_where = "no GC peak: a NaN GC"
        elif not _rise(gc, gc_peak) >= _RISE:
            gc_where = (
                f"no GC peak: its largest value, at w={widths[gc_peak]}, stands "
                f"less than {_RISE:.0%} above an end of the sweep"
            )
            gc_peak = None
        else:
            gc_where = f"w={widths[gc_peak]}"
        claims = [
            Claim.check(
                f"test loss peaks at the interpolation threshold ({where}; peak "
                f"at {loss_where})",
                "grid steps between the test-loss peak and the threshold",
                distance,
                "<=",
                1,
                n,
                dataset,
            ),
            Claim.check(
                "test loss descends again past the peak: the peak stands above "
                f"both the narrowest (w={widths[0]}) and the widest "
                f"(w={widths[-1]}) width",
                "min(peak - narrowest, peak - widest) / peak, test loss (seed means)",
                arms,
                ">=",
                _RISE,
                len(widths),
                dataset,
            ),
            Claim.check(
                f"GC peaks at the same width as test loss ({gc_where})",
                f"grid steps between the GC peak (>= {_RISE:.0%} above both ends) "
                "and the test-loss peak",
                math.nan if peak is None or gc_peak is None else abs(gc_peak - peak),
                "<=",
                1,
                n,
                dataset,
            ),
            Claim.check(
                "GC moves with test loss across widths",
                "Spearman(GC train, test loss) over widths (seed means)",
                spearman(gc, test_loss),
                ">=",
                0.7,
                len(widths),
                dataset,
            ),
        ]
        return claims, rows

    def plot(  # noqa: D102
        self, records: Sequence[dict[str, Any]], directory: Path, suffix: str
    ) -> list[Path]:
        return [self._plot_sweep(records, directory / f"double_descent{suffix}.png")]


def _quadratic(u: list[float], v: list[float]) -> tuple[float, float, float]:
    """Least-squares ``v ≈ a u² + b u + c``; NaNs if a value is not finite.

    Solved exactly, in rationals, from the normal equations and rounded once:
    the same runs give the same coefficients to the last bit, so the claims a
    rerun writes from saved runs are the ones the first run wrote (LAPACK's
    least squares moves in the last bits with the operands' alignment in
    memory). Fewer than three distinct ``u`` leave the fit undetermined: NaNs,
    as LAPACK's basic solution through two points could be any parabola, a
    "U" included. (A NaN or an infinity gives NaNs too: LAPACK fails outright
    on a NaN, and a diverged run would stop the analysis instead of failing
    its claims.)
    """
    if not all(math.isfinite(t) for t in [*u, *v]) or len(set(u)) < 3:
        return math.nan, math.nan, math.nan
    # floats are exact rationals: (AᵀA) x = Aᵀv with A's rows (u², u, 1)
    rows = [[Fraction(t) ** 2, Fraction(t), Fraction(1)] for t in u]
    system = [
        [sum(r[i] * r[j] for r in rows) for j in range(3)]
        + [sum(r[i] * Fraction(t) for r, t in zip(rows, v, strict=True))]
        for i in range(3)
    ]
    for col in range(3):  # Gauss-Jordan; AᵀA is positive definite here
        pivot = system[col][col]
        system[col] = [e / pivot for e in system[col]]
        for row in range(3):
            if row != col:
                factor = system[row][col]
                system[row] = [
                    e - factor * p
                    for e, p in zip(system[row], system[col], strict=True)
                ]
    a, b, c = (float(system[i][3]) for i in range(3))
    return a, b, c


class UCurve(_WidthSweep):
    """Test loss against GC is the classical U."""

    name = "u-curve"
    claim = (
        "Test loss against GC is U-shaped: a convex fit in log GC with its "
        "minimum inside the observed range, and the lowest test loss at neither "
        "the lowest- nor the highest-GC model"
    )
    _presets = _U

    def analyze(  # noqa: D102
        self, records: Sequence[dict[str, Any]], dataset: str
    ) -> tuple[list[Claim], list[dict[str, Any]]]:
        # dead nets (GC 0) have no log GC; a NaN (a diverged run) stays and
        # fails every claim, as min() and max() would skip it. Every run stays
        # in results.csv, dead or not
        every = result_rows(records)
        rows = [r for r in every if not r["gc_train"] <= 0]
        logs = [math.log(r["gc_train"]) for r in rows]
        loss = [r["test_loss"] for r in rows]
        a, b, _ = _quadratic(logs, loss)
        # only a convex fit has a minimum: a concave one's vertex is its maximum
        vertex = -b / (2 * a) if a > 0 else math.nan
        # every net dead leaves no point: claims that fail, not a ValueError
        lo, hi = (min(logs), max(logs)) if rows else (math.nan, math.nan)
        # an infinity (GC overflowing float32) is a diverged run as NaN is
        finite = bool(rows) and all(math.isfinite(v) for v in logs + loss)
        # the arms from each width's seed means: over single runs, seeds that
        # spread in GC put the best run beside the lowest-GC run of its own
        # width, and a loss that only rises (or falls) passed. Only widths
        # where every seed's net lives, so that each mean is over the same
        # seeds: a width's mean over the seeds left by a dead net carries
        # their level of GC, and could rank it above a width that lies above
        # it in every seed
        whole = every_seed(every, "width", lambda r: not r["gc_train"] <= 0)
        _, width_loss = seed_means(whole, "width", "test_loss")
        _, width_gc = seed_means(whole, "width", "gc_train")
        best = min(range(len(width_loss)), key=width_loss.__getitem__, default=0)
        arms = (
            min(width_gc[best] / min(width_gc), max(width_gc) / width_gc[best])
            if finite and whole
            else math.nan
        )
        n = len(rows)
        claims = [
            Claim.check(
                "the fit of test loss in log GC is convex",
                "curvature a of loss ≈ a·(log GC)² + b·log GC + c",
                a,
                ">",
                0.0,
                n,
                dataset,
            ),
            # this and the next test one side each: together, "inside the
            # observed range"
            Claim.check(
                "the fitted minimum is not past the highest-GC end",
                "(vertex - min log GC) / (max - min log GC)",
                (vertex - lo) / (hi - lo) if hi > lo else math.nan,
                "<",
                1.0,
                n,
                dataset,
            ),
            Claim.check(
                "the fitted minimum is not at the lowest-GC end",
                "(vertex - min log GC) / (max - min log GC)",
                (vertex - lo) / (hi - lo) if hi > lo else math.nan,
                ">",
                0.0,
                n,
                dataset,
            ),
            # both arms of the U in the data, not only in the fit: a parabola
            # through a loss that only falls (or only rises) with GC can put
            # its vertex inside the range; the best width at an end of the GC
            # range has no arm beyond it
            Claim.check(
                "the lowest test loss is not the lowest-GC model nor the "
                "highest-GC model (seed means per width)",
                "min(GC of the best width / lowest GC, highest GC / GC of the "
                "best width), seed means",
                arms,
                ">",
                1.0,
                n,
                dataset,
            ),
        ]
        return claims, every

    @closed_on_error
    def plot(  # noqa: D102
        self, records: Sequence[dict[str, Any]], directory: Path, suffix: str
    ) -> list[Path]:
        plt = pyplot()

        sweep = self._plot_sweep(records, directory / f"u_curve_sweep{suffix}.png")
        rows = [r for r in result_rows(records) if r["gc_train"] > 0]
        logs = [math.log(r["gc_train"]) for r in rows]
        a, b, c = _quadratic(logs, [r["test_loss"] for r in rows])
        fig, ax = plt.subplots(figsize=(6, 4))
        points = ax.scatter(
            [r["gc_train"] for r in rows],
            [r["test_loss"] for r in rows],
            c=[r["width"] for r in rows],
            cmap="viridis",
        )
        if not math.isnan(a):  # no line where the fit is undetermined
            grid = torch.linspace(min(logs), max(logs), 100)
            ax.plot(
                grid.exp().tolist(),
                (a * grid**2 + b * grid + c).tolist(),
                "k--",
                lw=1,
                label="quadratic fit in log GC",
            )
            ax.legend(fontsize=8)
        ax.set(
            xscale="log",
            xlabel="GC (train)",
            ylabel="test loss",
            title="Test loss against geometric complexity",
        )
        if rows:  # every net dead: no point to colour
            log_colorbar(fig, points, [r["width"] for r in rows], "width", spacing=1.9)
        return [sweep, save(fig, directory / f"u_curve{suffix}.png")]
