"""The benchmark scripts' own computations, on tiny models (not timings).

The scripts call library internals; when those change, a script that is only
run by ``make bench`` broke unseen (``bench_coupled`` stopped before writing
its JSON for a whole session). These run their pieces in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from reference import per_sample_sq_norms
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_coupled
import bench_measure


def _bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def test_bench_coupled_estimators_run_and_agree_on_independent_samples():
    # in eval mode the samples are independent: both 1-probe estimators give
    # each sample's ‖J^T u‖², the same numbers for the same probe
    model = _bn_mlp().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    values = {}
    for which in ("paired", "per sample"):
        gen = torch.Generator().manual_seed(2)
        xg = x.clone().requires_grad_(True)
        values[which] = bench_coupled._norms(which, xg, model(xg), gen, False)
    torch.testing.assert_close(values["paired"], values["per sample"])
    spread = bench_coupled.spread(model, x, draws=2)
    assert set(spread) == {"paired", "per sample"}


def test_bench_measure_references_are_exact():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    want = per_sample_sq_norms(model, x)
    torch.testing.assert_close(bench_measure.vmap_jacrev_sq_norms(model, x), want)
    torch.testing.assert_close(bench_measure.vmap_jacfwd_sq_norms(model, x), want)
    torch.testing.assert_close(bench_measure.naive_sq_norms(model, x), want)
    bare = bench_measure.bare_exact(model, x)()
    torch.testing.assert_close(bare, want.mean())
