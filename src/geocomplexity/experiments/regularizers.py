"""``regularizers``: L2, flatness, spectral-norm, explicit GC and input noise lower GC.

An MLP trained with Adam for a fixed number of epochs under each penalty at a
sweep of strengths. A stronger penalty also leaves the model less fitted, and a
less-fitted model has lower GC anyway, so each run is also compared with the
unregularized run *at the same training loss*: the baseline's GC is logged
against its training loss every epoch and read off (interpolated in log GC) at
the regularized run's final training loss.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geocomplexity.data import load
from geocomplexity.experiments.base import Experiment, result_rows, seed_means
from geocomplexity.experiments.claims import Claim, spearman
from geocomplexity.experiments.figures import closed_on_error, data_scale, pyplot, save
from geocomplexity.experiments.runner import Context, Run
from geocomplexity.measure import measure
from geocomplexity.models import mlp
from geocomplexity.regularizers import (
    L2,
    GeometricComplexity,
    GradientNorm,
    SpectralNorm,
)
from geocomplexity.training import fit

_STRENGTHS = {
    "l2": [1e-4, 3e-4, 1e-3, 3e-3],
    "gradient_norm": [0.01, 0.03, 0.1, 0.3],
    "spectral_norm": [1e-3, 3e-3, 1e-2, 3e-2],
    "geometric_complexity": [1e-3, 3e-3, 1e-2, 3e-2],
    "input_noise": [0.1, 0.2, 0.5, 1.0],
}
_PRESETS = {
    "smoke": {"epochs": 3, "width": 32, "seeds": 1, "n": 500, "levels": [1, 3]},
    "quick": {
        "epochs": 100,
        "width": 128,
        "seeds": 1,
        "n": 4000,
        "levels": [1, 2, 3],  # the weakest level is left to paper: 10-min budget
    },
    "paper": {
        "epochs": 200,
        "width": 128,
        "seeds": 3,
        "n": 4000,
        "levels": [0, 1, 2, 3],
    },
}
#: a strength is "non-trivial" when it raises the final train loss by this factor
_NONTRIVIAL = 1.2
#: one marker per kind, so that colour is not the only cue
_MARKERS = ("o", "s", "^", "D", "v")
# part of each run's config (and hash): editing one reruns the sweep
_FIXED = {"lr": 1e-3, "batch": 128, "gc_subset": 1000}


def _term(kind: str, strength: float):
    return {
        "l2": lambda: L2(strength),
        "gradient_norm": lambda: GradientNorm(strength),
        "spectral_norm": lambda: SpectralNorm(strength),
        "geometric_complexity": lambda: GeometricComplexity(strength),
        "input_noise": lambda: None,
    }[kind]()


def _matched_gc(curve: list[tuple[float, float]], loss: float) -> float:
    """The baseline's GC when its train loss first fell to ``loss``.

    Log-linear between epochs; NaN if it never rose that high or fell that low.
    The first crossing decides, whatever its GC: a GC of 0 at one end is 0
    inside the epoch (the log-linear limit), and a NaN GC there gives NaN (not
    known there; a later crossing, after the loss rose again, is another point
    of training and does not stand in for it).
    """
    for (l0, g0), (l1, g1) in itertools.pairwise(curve):
        if l0 >= loss >= l1:
            t = 0.0 if l0 == l1 else (l0 - loss) / (l0 - l1)
            if t == 0.0:
                return g0
            if t == 1.0:
                return g1
            if math.isnan(g0) or math.isnan(g1):
                return math.nan
            if g0 == 0 or g1 == 0:
                return 0.0
            return math.exp((1 - t) * math.log(g0) + t * math.log(g1))
    return math.nan


class Regularizers(Experiment):
    """GC under each regularizer, against strength and at matched train loss."""

    name = "regularizers"
    claim = (
        "L2, flatness, spectral-norm, explicit-GC and input-noise regularization "
        "each lower GC: Spearman(strength, GC) <= -0.8, and GC below the "
        "unregularized run's at the same training loss (the strengths that "
        f"end at >= {_NONTRIVIAL:g}x its train loss)"
    )

    def runs(self, preset: str, dataset: str, seeds: int | None) -> list[Run]:  # noqa: D102
        p = _PRESETS[preset]
        common = {
            "dataset": dataset,
            "epochs": p["epochs"],
            "width": p["width"],
            "n": p["n"],
            **_FIXED,
        }
        runs = [
            Run.make(self.name, s, kind="none", strength=0.0, **common)
            for s in range(seeds or p["seeds"])
        ]
        for kind, strengths in _STRENGTHS.items():
            for level in p["levels"]:
                runs += [
                    Run.make(
                        self.name, s, kind=kind, strength=strengths[level], **common
                    )
                    for s in range(seeds or p["seeds"])
                ]
        return runs

    def execute(self, run: Run, context: Context) -> dict[str, Any]:  # noqa: D102
        data = load(run["dataset"])
        x, y = data.x_train[: run["n"]], data.y_train[: run["n"]]
        w = run["width"]
        model = mlp(x.shape[1], [w, w], data.num_classes, seed=run.seed)
        kind, strength = run["kind"], run["strength"]
        baseline = kind == "none"
        h = fit(
            model,
            (x, y),
            (data.x_test, data.y_test),
            optimizer="adam",
            lr=run["lr"],
            batch_size=run["batch"],
            epochs=run["epochs"],
            regularizer=None if baseline else _term(kind, strength),
            input_noise_std=strength if kind == "input_noise" else 0.0,
            seed=run.seed,
            track_gc_every=1 if baseline else None,
            gc_subset=run["gc_subset"],
            eval_every=1 if baseline else run["epochs"],
            device=context.device,
            progress=False,
        )
        return {
            "train_loss": h.final["train_loss"],
            "test_acc": h.final["test_acc"],
            "test_loss": h.final["test_loss"],
            "gc_train": measure(
                model, x[: run["gc_subset"]], method="exact", progress=False
            ).value,
            # the baseline's GC against train loss along training
            "curve": [(r["train_loss"], r["gc_train"]) for r in h.records]
            if baseline
            else None,
        }

    def analyze(  # noqa: D102
        self, records: Sequence[dict[str, Any]], dataset: str
    ) -> tuple[list[Claim], list[dict[str, Any]]]:
        rows = result_rows(records)
        curves = {
            r["config"]["seed"]: r["result"]["curve"]
            for r in records
            if r["config"]["kind"] == "none"
        }
        base = {r["seed"]: r for r in rows if r["kind"] == "none"}
        for r in rows:
            r["gc_baseline_matched"] = _matched_gc(curves[r["seed"]], r["train_loss"])
            # a NaN (a diverged run, or its baseline) is not shown trivial: it
            # stays in the matched-loss claim and fails it (NaN >= x is False,
            # which dropped it and let the claim pass on the rest)
            r["nontrivial"] = r["kind"] != "none" and not (
                r["train_loss"] < _NONTRIVIAL * base[r["seed"]]["train_loss"]
            )
        claims = []
        for kind in _STRENGTHS:
            mine = [r for r in rows if r["kind"] == kind]
            with_zero = mine + [b for b in base.values()]
            claims.append(
                Claim.check(
                    f"{kind}: stronger penalty, lower GC",
                    "Spearman(strength, GC train), baseline as strength 0",
                    spearman(
                        [r["strength"] for r in with_zero],
                        [r["gc_train"] for r in with_zero],
                    ),
                    "<=",
                    -0.8,
                    len(with_zero),
                    dataset,
                )
            )
            strong = [r for r in mine if r["nontrivial"]]
            below = [r["gc_train"] < r["gc_baseline_matched"] for r in strong]
            claims.append(
                Claim.check(
                    f"{kind}: GC below the unregularized run's at the same train loss "
                    f"(strengths raising train loss >= {_NONTRIVIAL}x)",
                    "fraction of those runs",
                    sum(below) / len(below) if below else math.nan,
                    ">=",
                    1.0,
                    len(below),
                    dataset,
                )
            )
        return claims, rows

    @closed_on_error
    def plot(  # noqa: D102
        self, records: Sequence[dict[str, Any]], directory: Path, suffix: str
    ) -> list[Path]:
        plt = pyplot()

        rows = result_rows(records)
        base = [r for r in rows if r["kind"] == "none"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for r in records:
            if r["config"]["kind"] == "none":
                loss, gc = zip(*r["result"]["curve"], strict=True)
                axes[1].plot(loss, gc, "k-", lw=1, alpha=0.6)
        used = {0}
        for i, kind in enumerate(_STRENGTHS):
            mine = [r for r in rows if r["kind"] == kind]
            if not mine:
                continue
            # level j >= 1 is the kind's j-th strength; 0 is the unregularized
            # run, which the claim's Spearman counts as strength 0
            swept = sorted(set(_STRENGTHS[kind]) | {r["strength"] for r in mine})
            level = {0.0: 0} | {v: j + 1 for j, v in enumerate(swept)}
            # the seed mean at each strength, joined; each seed a faint dot
            strengths, mean = seed_means(base + mine, "strength", "gc_train")
            used |= {level[v] for v in strengths}
            marker = _MARKERS[i % len(_MARKERS)]
            shown = ", ".join(f"{v:g}" for v in strengths if v)
            axes[0].plot(
                [level[v] for v in strengths],
                mean,
                "-" + marker,
                color=f"C{i}",
                label=f"{kind} ({shown})",
            )
            axes[0].plot(
                [level[r["strength"]] for r in mine],
                [r["gc_train"] for r in mine],
                marker,
                ms=3,
                color=f"C{i}",
                alpha=0.3,
            )
            axes[1].plot(
                [r["train_loss"] for r in mine],
                [r["gc_train"] for r in mine],
                marker,
                color=f"C{i}",
                label=kind,
            )
        if base:  # where every kind's line starts
            axes[0].plot(
                [0],
                [statistics.fmean(r["gc_train"] for r in base)],
                "k*",
                ms=10,
                zorder=3,
                label="unregularized (strength 0)",
            )
            axes[0].plot(
                [0] * len(base), [r["gc_train"] for r in base], "k.", alpha=0.3
            )
        axes[0].set_xticks(sorted(used))
        # log axes only where the values span a decade (see data_scale)
        losses = [v for ln in axes[1].lines for v in ln.get_xdata()]
        gcs = [v for ln in axes[1].lines for v in ln.get_ydata()]
        axes[0].set(
            yscale=data_scale([v for ln in axes[0].lines for v in ln.get_ydata()]),
            xlabel="strength level: 0 none, then each kind's strengths, weakest "
            "first\n(values in the legend; line: seed mean, dots: seeds)",
            ylabel="GC (train)",
            title="GC against penalty strength",
        )
        axes[1].set(
            xscale=data_scale(losses),
            yscale=data_scale(gcs),
            xlabel="final train loss",
            ylabel="GC (train)",
            title="GC against train loss (line: unregularized run)",
        )
        axes[0].legend(fontsize=8)
        return [save(fig, directory / f"regularizers{suffix}.png")]
