r"""``transfer``: the transfer-theorem inequality, at initialization and trained.

Per sample and per output, :math:`\|\nabla_x f\|^2 \le \|\nabla_\theta f\|^2 /
\sum_l T_l^2` with operator norms (see :mod:`geocomplexity.bounds`). The claim is
that it holds on every sample; the distribution of the ratio of the two sides
shows how tight it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from geocomplexity.bounds import transfer_bound
from geocomplexity.data import load
from geocomplexity.experiments.base import Experiment
from geocomplexity.experiments.claims import Claim
from geocomplexity.experiments.figures import closed_on_error, pyplot, save
from geocomplexity.experiments.runner import Context, Run
from geocomplexity.models import mlp
from geocomplexity.training import fit

_PRESETS = {
    "smoke": {"samples": 200, "epochs": 2, "seeds": 1, "widths": [32, 32]},
    "quick": {"samples": 1000, "epochs": 30, "seeds": 2, "widths": [128, 128]},
    "paper": {"samples": 2000, "epochs": 100, "seeds": 3, "widths": [256, 256, 256]},
}
_QUANTILES = (0.0, 0.05, 0.5, 0.95, 1.0)


class Transfer(Experiment):
    """The transfer theorem on MLPs, per sample and output."""

    name = "transfer"
    claim = (
        "The transfer-theorem inequality ‖∇ₓf‖² ≤ ‖∇_θ f‖²/Σ T_l² holds on every "
        "sample and output, at initialization and after training"
    )

    def runs(self, preset: str, dataset: str, seeds: int | None) -> list[Run]:  # noqa: D102
        p = _PRESETS[preset]
        return [
            Run.make(
                self.name,
                seed,
                dataset=dataset,
                stage=stage,
                widths=p["widths"],
                epochs=p["epochs"] if stage == "trained" else 0,
                samples=p["samples"],
                # part of the config (and hash): editing one reruns the runs
                lr=1e-3,
                batch=128,
            )
            for stage in ("init", "trained")
            for seed in range(seeds or p["seeds"])
        ]

    def execute(self, run: Run, context: Context) -> dict[str, Any]:  # noqa: D102
        data = load(run["dataset"])
        model = mlp(
            data.x_train.shape[1], run["widths"], data.num_classes, seed=run.seed
        )
        history = None
        if run["epochs"]:
            history = fit(
                model,
                (data.x_train, data.y_train),
                optimizer="adam",
                lr=run["lr"],
                batch_size=run["batch"],
                epochs=run["epochs"],
                seed=run.seed,
                device=context.device,
                progress=False,
            )
        # every available sample, test then train, up to the preset's count
        x = torch.cat([data.x_test, data.x_train])[: run["samples"]].double()
        t = transfer_bound(model.cpu().double(), x)
        ratio = t.tightness.flatten()
        ratio = ratio[~torch.isnan(ratio)]
        return {
            "samples": len(x),
            "pairs": t.holds.numel(),
            "holds": int(t.holds.sum()),
            "ratio_quantiles": torch.quantile(
                ratio, torch.tensor(_QUANTILES, dtype=ratio.dtype)
            ).tolist(),
            # bins of 0.1 in log10(ratio) from -4 to +0.5: any mass above 0
            # would be a violation, so the range shows one
            "log10_ratio_hist": torch.histc(
                ratio.clamp(1e-4, 3.0).log10(), bins=45, min=-4.0, max=0.5
            ).tolist(),
            "train_acc": history.final["train_acc"] if history else None,
        }

    def analyze(  # noqa: D102
        self, records: Sequence[dict[str, Any]], dataset: str
    ) -> tuple[list[Claim], list[dict[str, Any]]]:
        rows = []
        for r in records:
            res = r["result"]
            q = dict(zip(_QUANTILES, res["ratio_quantiles"], strict=True))
            rows.append(
                {
                    **r["config"],
                    "samples": res["samples"],
                    "pairs": res["pairs"],
                    "holds": res["holds"],
                    "ratio_median": q[0.5],
                    "ratio_max": q[1.0],
                    "train_acc": res["train_acc"],
                }
            )
        claims = []
        for stage in ("init", "trained"):
            mine = [r for r in rows if r["stage"] == stage]
            pairs = sum(r["pairs"] for r in mine)
            frac = sum(r["holds"] for r in mine) / pairs
            samples = min(r["samples"] for r in mine)
            claims.append(
                Claim.check(
                    f"transfer theorem holds on every sample and output ({stage})",
                    f"fraction of (sample, output) pairs, {samples} samples per model",
                    frac,
                    ">=",
                    1.0,
                    pairs,
                    dataset,
                )
            )
        return claims, rows

    @closed_on_error
    def plot(  # noqa: D102
        self, records: Sequence[dict[str, Any]], directory: Path, suffix: str
    ) -> list[Path]:
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6, 4))
        edges = torch.linspace(-4.0, 0.5, 46)
        centers = ((edges[1:] + edges[:-1]) / 2).tolist()
        for stage in ("init", "trained"):
            hist = torch.zeros(45)
            for r in records:
                if r["config"]["stage"] == stage:
                    hist += torch.tensor(r["result"]["log10_ratio_hist"])
            ax.plot(centers, (hist / hist.sum()).tolist(), "o-", ms=3, label=stage)
        ax.axvline(0, color="k", lw=0.8)
        ax.set(
            xlabel="log10( ‖∇ₓf‖² / bound )  (≤ 0 where the theorem holds)",
            ylabel="fraction of (sample, output) pairs",
            title="Transfer theorem: tightness",
        )
        ax.legend()
        return [save(fig, directory / f"transfer{suffix}.png")]
