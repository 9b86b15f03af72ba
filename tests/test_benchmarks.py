"""The benchmark scripts' own computations, on tiny models (not timings).

The scripts call library internals; when those change, a script that is only
run by ``make bench`` broke unseen (``bench_coupled`` stopped before writing
its JSON for a whole session). These run their pieces in seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
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


def test_bench_measure_without_mnist1d_skips_that_stage_and_keeps_the_rest(
    monkeypatch, tmp_path
):
    # mnist1d imports requests and matplotlib.pyplot at import time: on a GPU
    # machine without them (gpu_check.sh prepare copies mnist1d alone) the
    # MNIST-1D stage raised ModuleNotFoundError after every model had been
    # timed, and main() ended without writing its JSON
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    mn = bench_measure.bench_mnist1d(0.0, 1, 1)
    assert "mnist1d" in mn["skipped"]
    result = {
        "meta": {"threads": 1, "torch": torch.__version__, "processor": "cpu"},
        "models": {},
        "floors": [],
        "mnist1d": mn,
    }
    text = bench_measure.markdown(result)
    assert "MNIST-1D" in text and "skipped" in text


def test_paper_scale_keeps_the_widths_timed_before_a_failing_one(monkeypatch, tmp_path):
    # gpu_check.sh gives paper_scale.py 60 s for three widths, and the JSON was
    # written once, after the last: a run cut off at width 64 (or failing
    # there) left no JSON at all, though widths 1 and 8 had been timed
    import paper_scale

    def time_width(k, n, device, gen):
        if k == 8:
            raise RuntimeError("cut off")
        return {"width": k, "params": 1, "epoch_50k_s": 1.0, "eval_10k_s": 1.0,
                "gc_exact_1000_s": 1.0, "paper_run_h": 1.0}  # fmt: skip

    monkeypatch.setattr(paper_scale, "time_width", time_width)
    out = tmp_path / "paper_scale.json"
    with pytest.raises(RuntimeError, match="cut off"):
        paper_scale.main(["--device", "cpu", "--widths", "1,8", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["width"] for r in rows] == [1]


def test_bench_regularizers_shows_a_penalty_that_failed(monkeypatch):
    # a penalty whose step raised was recorded with its error and no timings;
    # the table showed "—", as for a method the model does not take, and the
    # floor_verdicts counts left it out: a floored penalty that crashed on the
    # GPU read as nothing to report
    import bench_regularizers

    class Broken(bench_regularizers.SpectralNorm):
        def backward(self, *args, **kwargs):
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(
        bench_regularizers, "terms", lambda: {"spectral_norm": Broken(1e-3)}
    )
    rec = bench_regularizers.bench_case("a", 0.0, (1, 1), only=("spectral_norm",))
    assert "no kernel" in rec["methods"]["spectral_norm"]["error"]
    cases = {"a": rec}
    text = bench_regularizers.markdown({"cases": cases})
    row = next(line for line in text.splitlines() if line.startswith("| spectral"))
    assert "error" in row, row
    assert "no kernel for this device" in text
    assert bench_regularizers.floor_verdicts(cases)["error"] == 1


def test_a_method_that_fails_in_a_later_round_is_dropped_not_the_benchmark():
    # only the warm-up caught errors: a method raising in round 3 (a GPU out
    # of memory) crashed the whole benchmark and lost every timing so far
    calls = {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] > 5:  # two warm-ups, one calibration, then rounds
            raise RuntimeError("CUDA out of memory\nmore")

    methods = {
        "ok": bench_measure.Timed(lambda: None),
        "flaky": bench_measure.Timed(flaky),
    }
    rounds = bench_measure.time_interleaved(methods, 0.0, 6, 6, min_sample_s=0.0)
    assert rounds == 6 and len(methods["ok"].samples) == 6
    assert methods["flaky"].samples == []
    assert methods["flaky"].error == "round 3: RuntimeError: CUDA out of memory"


def test_bench_coupled_table_shows_a_step_that_failed():
    # a step that raised had no ratio, and the table crashed on None:.2f
    spread = {w: {"mean": 1.0, "std": 0.1} for w in ("paired", "per sample")}
    timing = {
        "paired": {"ratio": 2.0, "interval": (2.0, 1.9, 2.1), "error": None},
        "per sample": {"ratio": None, "interval": None, "error": "OOM"},
    }
    table = bench_coupled.markdown({"timing": timing, "spread": spread})
    assert "2.00× (1.90–2.10)" in table and "error: OOM" in table


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    "script, stored",
    [
        ("bench_measure", "measure.json"),
        ("bench_regularizers", "regularizers.json"),
        ("bench_coupled", "coupled.json"),
    ],
)
def test_readme_tables_are_the_committed_json_regenerated(script, stored):
    # the README's Performance tables are what each script's markdown() prints
    # for the committed JSON: a hand edit of a number, or a JSON replaced by a
    # new run without the README, shows up here as the first line that differs
    import importlib

    text = importlib.import_module(script).markdown(
        json.loads((RESULTS / stored).read_text())
    )
    readme = set(README.read_text().splitlines())
    missing = [line for line in text.splitlines() if line and line not in readme]
    assert not missing, f"{stored}: not in README.md: {missing[:3]}"


@pytest.mark.parametrize(
    "stored", sorted(p.name for p in RESULTS.glob("measure*.json"))
)
def test_stored_measuring_verdicts_follow_from_their_intervals(stored):
    # yes / no only where the 95% interval clears the floor, noise where the
    # floor lies inside it: the rule the README states, for every stored run
    result = json.loads((RESULTS / stored).read_text())
    for f in result["floors"]:
        for value, ci, judged in (
            (f["value"], f["paired"], f["verdict"]),
            (f["bare_autograd"], f["bare_paired"], f["bare_verdict"]),
        ):
            assert bench_measure.verdict(value, ci, f["limit"]) == judged, f


@pytest.mark.parametrize(
    "stored", sorted(p.name for p in RESULTS.glob("regularizers*.json"))
)
def test_stored_penalty_verdicts_and_counts_follow_from_their_intervals(stored):
    # each marked verdict from its ratio and interval, and the stored
    # floor_verdicts (the README's "N met, M missed") from those verdicts
    import bench_regularizers

    result = json.loads((RESULTS / stored).read_text())
    for case in result["cases"].values():
        for name, m in case["methods"].items():
            ref = name.removeprefix("bare autograd: ")
            if ref not in bench_regularizers.FLOORS:
                continue
            ci = m["ratio_95_interval"]
            r = m["ratio_to_plain_step"]
            judged = bench_measure.verdict(
                r, None if ci is None else [r, *ci], bench_regularizers.FLOORS[ref]
            )
            assert (m.get("verdict") or m.get("reference_verdict")) == judged, name
    counts = bench_regularizers.floor_verdicts(result["cases"])
    assert {k: counts[k] for k in ("pass", "fail", "noise")} == result["floor_verdicts"]
