r"""``init-depth``: deeper networks start with lower geometric complexity.

For a bias-free ReLU MLP, :math:`\mathbb{E}\,\mathrm{GC}_{init} \approx k\prod_l
\sigma_l^2\,\mathrm{fan\_in}_l\,2^{-(L-1)}`: it decays exponentially with depth
under the PyTorch-default, LeCun and Glorot schemes, and stays near :math:`2k`
under He initialization, the predicted exception.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from geocomplexity.data import load
from geocomplexity.experiments.base import Experiment, seed_means
from geocomplexity.experiments.claims import Claim, spearman
from geocomplexity.experiments.figures import closed_on_error, log_xticks, pyplot, save
from geocomplexity.experiments.runner import Context, Run
from geocomplexity.measure import measure
from geocomplexity.models import INITS, mlp

_PRESETS = {
    "smoke": {"depths": [1, 2, 4], "width": 32, "seeds": 2, "points": 200},
    "quick": {"depths": [1, 2, 4, 8, 16, 32], "width": 128, "seeds": 5, "points": 1000},
    "paper": {
        "depths": [1, 2, 4, 8, 16, 32],
        "width": 256,
        "seeds": 10,
        "points": 1000,
    },
}
_FALLING = ("default", "glorot", "lecun")


class InitDepth(Experiment):
    """GC at initialization against depth, per init scheme."""

    name = "init-depth"
    claim = (
        "GC at initialization falls with depth under PyTorch-default, Glorot and "
        "LeCun init (Spearman <= -0.9); He init is the predicted exception, its "
        "mean staying within 2x of 2k at every depth"
    )

    def runs(self, preset: str, dataset: str, seeds: int | None) -> list[Run]:  # noqa: D102
        p = _PRESETS[preset]
        return [
            Run.make(
                self.name,
                seed,
                dataset=dataset,
                init=init,
                depth=depth,
                width=p["width"],
                points=p["points"],
            )
            for init in INITS
            for depth in p["depths"]
            for seed in range(seeds or p["seeds"])
        ]

    def execute(self, run: Run, context: Context) -> dict[str, Any]:  # noqa: D102
        data = load(run["dataset"])
        x = data.x_test[: run["points"]]
        model = mlp(
            x.shape[1],
            [run["width"]] * run["depth"],
            data.num_classes,
            init=run["init"],
            seed=run.seed,
        )
        gc = measure(model, x, method="exact", progress=False)
        # a 1-D slice of logit 0 along the segment between two test points
        t = torch.linspace(0, 1, 101)[:, None]
        with torch.no_grad():
            line = model(x[0] + t * (x[1] - x[0]))[:, 0]
        return {
            "gc": gc.value,
            "gc_stderr": gc.stderr,
            "outputs": data.num_classes,
            "slice": line.tolist(),
        }

    def analyze(  # noqa: D102
        self, records: Sequence[dict[str, Any]], dataset: str
    ) -> tuple[list[Claim], list[dict[str, Any]]]:
        rows = [{**r["config"], "gc": r["result"]["gc"]} for r in records]
        # k, the number of logits: He init's predicted mean GC is 2k
        outputs = {r["result"].get("outputs") for r in records} - {None}
        k = outputs.pop() if len(outputs) == 1 else load(dataset).num_classes
        claims = []
        for init in INITS:
            mine = [r for r in rows if r["init"] == init]
            if init in _FALLING:
                claims.append(
                    Claim.check(
                        f"GC at init falls with depth ({init} init)",
                        "Spearman(depth, GC)",
                        spearman([r["depth"] for r in mine], [r["gc"] for r in mine]),
                        "<=",
                        -0.9,
                        len(mine),
                        dataset,
                    )
                )
            else:
                # not only "does not fall": the mean stays at its prediction,
                # within a factor of 2 at every depth (seed means)
                depths, means = seed_means(mine, "depth", "gc")
                # a zero, NaN or missing mean fails (max() would skip a NaN)
                ok = means and all(math.isfinite(m) and m > 0 for m in means)
                worst = (
                    max(max(m, 2 * k) / min(m, 2 * k) for m in means)
                    if ok
                    else math.inf
                )
                claims.append(
                    Claim.check(
                        f"He init is the exception: GC at init stays near the "
                        f"predicted 2k = {2 * k} at every depth"
                        + (f" ({depths[0]}-{depths[-1]})" if depths else ""),
                        "max over depths of the factor between mean GC and 2k",
                        worst,
                        "<=",
                        2.0,
                        len(mine),
                        dataset,
                    )
                )
        return claims, rows

    @closed_on_error
    def plot(  # noqa: D102
        self, records: Sequence[dict[str, Any]], directory: Path, suffix: str
    ) -> list[Path]:
        plt = pyplot()

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        depths = sorted({r["config"]["depth"] for r in records})
        # a marker per scheme as well as a colour: four tab10 colours include
        # green and red, which colour-blind readers confuse
        for init, marker in zip(INITS, "os^D", strict=True):
            mine = [r for r in records if r["config"]["init"] == init]
            means = [
                statistics.fmean(
                    r["result"]["gc"] for r in mine if r["config"]["depth"] == d
                )
                for d in depths
            ]
            line = ax.plot(depths, means, marker + "-", label=init)[0]
            ax.plot(
                [r["config"]["depth"] for r in mine],
                [r["result"]["gc"] for r in mine],
                marker,
                color=line.get_color(),
                ms=3,
                alpha=0.3,
            )
        # He init's predicted mean, which its claim compares with
        outputs = {r["result"].get("outputs") for r in records} - {None}
        if len(outputs) == 1:
            k = outputs.pop()
            ax.axhline(2 * k, color="k", ls=":", lw=0.8, label=f"2k = {2 * k} (He)")
        seeds = len({r["config"]["seed"] for r in records})
        ax.set(
            yscale="log",
            xlabel="hidden layers",
            ylabel="GC at initialization (mean of "
            + (f"{seeds} seeds)" if seeds > 1 else "1 seed)"),
            title="GC at init against depth (dots: each seed)",
        )
        log_xticks(ax, depths)
        ax.legend()
        for r in records:
            c = r["config"]
            if c["init"] == "default" and c["seed"] == 0:
                line = r["result"]["slice"]
                t = torch.linspace(0, 1, len(line)).tolist()
                ax2.plot(t, line, label=f"depth {c['depth']}")
        ax2.set(
            xlabel="t, on the segment x₀ + t·(x₁ − x₀) between two test points",
            ylabel="logit 0",
            title="1-D slices, PyTorch-default init",
        )
        ax2.legend(fontsize=7)
        return [save(fig, directory / f"init_depth{suffix}.png")]
