"""Batched or looped VJPs chosen by timing (geocomplexity.tuning)."""

from __future__ import annotations

import gc

import pytest
import torch
from reference import per_sample_sq_norms
from torch import nn

import geocomplexity as gcx
from geocomplexity import jacobian, tuning


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()


class FakeClock:
    """Each timed call takes ``loop`` seconds with chunk 1, else ``batched``."""

    def __init__(self, loop: float, batched: float) -> None:
        self.loop, self.batched = loop, batched
        self.now = 0.0
        self.chunk = 0

    def __call__(self) -> float:
        return self.now

    def run(self, chunk: int, run) -> None:
        def compute() -> torch.Tensor:
            self.now += self.loop if chunk == 1 else self.batched
            return torch.zeros(())

        run(compute, torch.device("cpu"))


def decide(model: nn.Module, clock: FakeClock, default: int = 8) -> list[int]:
    """The chunks of successive calls until (and one past) the decision."""
    chunks = []
    for _ in range(1 + 2 * tuning.TRIALS_EACH + 1):
        chunk, run = tuning.chunk_for(model, "key", default, clock=clock)
        chunks.append(chunk)
        clock.run(chunk, run)
    return chunks


@pytest.mark.parametrize(
    ("loop", "batched", "chosen"),
    [(1.0, 2.0, 1), (2.0, 1.0, 8), (0.97, 1.0, 8), (0.9, 1.0, 1)],
)
def test_the_faster_way_is_chosen_after_the_trials(loop, batched, chosen):
    model = mlp()
    chunks = decide(model, FakeClock(loop, batched))
    # a warm-up with the default, then loop and default alternately, then
    # the choice (a near tie keeps the default)
    trials = [1, 8] * tuning.TRIALS_EACH
    assert chunks == [8, *trials, chosen]
    assert tuning.decisions(model) == {"key": chosen}


def decide_from(model: nn.Module, loop: list[float], batched: list[float]) -> None:
    """The warm-up and the trials, the timed calls taking these times in turn."""
    times = {1: iter(loop), 4: iter(batched)}
    clock = FakeClock(0.0, 0.0)
    for call in range(1 + 2 * tuning.TRIALS_EACH):
        chunk, run = tuning.chunk_for(model, "key", 4, clock=clock)
        if call:  # after the warm-up
            setattr(clock, "loop" if chunk == 1 else "batched", next(times[chunk]))
        clock.run(chunk, run)


def test_one_slow_call_does_not_condemn_a_way():
    # one slow loop call (a page fault, another process): the medians decide
    model = mlp()
    decide_from(model, [50.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert tuning.decisions(model) == {"key": 1}


def test_keys_are_decided_apart_and_entries_go_with_the_model():
    model = mlp()
    decide(model, FakeClock(1.0, 2.0))
    chunk, _ = tuning.chunk_for(model, "other", 8)
    assert chunk == 8  # a new key starts with its own warm-up
    assert tuning.decisions(model) == {"key": 1}
    gc.collect()  # models of earlier tests go first
    before = len(tuning._TRIALS)
    del model
    gc.collect()
    assert len(tuning._TRIALS) == before - 1


def test_every_call_of_a_tuned_measurement_is_exact():
    # the trial calls' results are the answers: each one, whichever way it
    # ran, matches brute force, and the default agrees with a loop
    model = mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    want = per_sample_sq_norms(model, x)
    for _ in range(1 + 2 * tuning.TRIALS_EACH + 2):
        got = gcx.jacobian_sq_norms(model, x)
        assert torch.allclose(got, want, rtol=1e-10, atol=0)
    (chosen,) = tuning.decisions(model).values()
    assert chosen in (1, jacobian._default_chunk(model, 4, x, 4))


def spy_chunks(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = jacobian.reverse_sq_norms

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(jacobian, "reverse_sq_norms", spy)
    return seen


@pytest.mark.parametrize("loop_faster", [True, False])
def test_later_calls_take_the_chosen_chunk(monkeypatch, loop_faster):
    model = mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    seen = spy_chunks(monkeypatch)
    clock = {"now": 0.0}

    def fake() -> float:  # a loop call takes 1 s, a batched one 3 s (or vice versa)
        chunk = seen[-1] if seen else 0
        slow = chunk > 1 if loop_faster else chunk == 1
        clock["now"] += 1.5 if slow else 0.5  # read twice per call
        return clock["now"]

    monkeypatch.setattr(tuning, "_clock", fake)
    default = jacobian._default_chunk(model, 4, x, 4)
    for _ in range(1 + 2 * tuning.TRIALS_EACH + 3):
        gcx.jacobian_sq_norms(model, x)
    want = 1 if loop_faster else default
    assert seen[: 1 + 2 * tuning.TRIALS_EACH] == [default] + [1, default] * 3
    assert seen[-3:] == [want] * 3


def test_untimed_where_numbers_must_repeat(monkeypatch):
    model = mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    seen = spy_chunks(monkeypatch)
    default = jacobian._default_chunk(model, 4, x, 4)
    runs = 1 + 2 * tuning.TRIALS_EACH + 1
    # a penalty (its gradients may differ in the last bits between the two)
    for _ in range(runs):
        gcx.jacobian_sq_norms(model, x, create_graph=True)
    # fixed_chunks (fit measures under it)
    with tuning.fixed_chunks():
        for _ in range(runs):
            gcx.jacobian_sq_norms(model, x)
    # deterministic algorithms
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(runs):
            gcx.jacobian_sq_norms(model, x)
    finally:
        torch.use_deterministic_algorithms(was)
    # a chunk the caller chose
    for _ in range(runs):
        gcx.jacobian_sq_norms(model, x, chunk_size=2)
    assert seen == [default] * (3 * runs) + [2] * runs
    assert tuning.decisions(model) == {}
    assert model not in tuning._TRIALS or not any(
        t.calls for t in tuning._TRIALS[model].values()
    )


def test_fit_measures_untimed():
    from geocomplexity.training import fit

    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(40, 6)
    y = torch.randint(0, 3, (40,))
    fit(model, (x, y), epochs=9, batch_size=20, track_gc_every=1, progress=False)
    assert model not in tuning._TRIALS


def test_trials_on_another_accelerator_wait_for_its_kernels(monkeypatch):
    # timed launches alone would say nothing of which way is faster
    calls = []
    monkeypatch.setattr(torch.xpu, "synchronize", lambda *a: calls.append(a))
    tuning._sync(torch.device("xpu"))
    tuning._sync(torch.device("cpu"))
    assert len(calls) == 1


class RegimeClock(FakeClock):
    """A call's time depends on its way and on whether the last call ran it too.

    ``times[(chunk == 1, same)]``: as glibc's allocator, whose mmap threshold
    moves as large blocks are freed, makes a batched pass after a batched
    pass faster or slower than one after a loop call.
    """

    def __init__(self, times: dict[tuple[bool, bool], float]) -> None:
        super().__init__(0.0, 0.0)
        self.times, self.last = times, None

    def run(self, chunk: int, run) -> None:
        def compute() -> torch.Tensor:
            self.now += self.times[(chunk == 1, chunk == self.last)]
            self.last = chunk
            return torch.zeros(())

        run(compute, torch.device("cpu"))


def calls(model: nn.Module, clock: FakeClock, n: int, default: int = 8) -> list[int]:
    chunks = []
    for _ in range(n):
        chunk, run = tuning.chunk_for(model, "key", default, clock=clock)
        chunks.append(chunk)
        clock.run(chunk, run)
    return chunks


def test_a_choice_the_chosen_ways_own_run_belies_goes_to_the_other():
    # after a loop call the batched pass takes 1.0, after another batched
    # pass 2.0; the loop 1.2 either way. The trials (alternating) chose the
    # default, which then ran slower than the loop, for good
    model = mlp()
    times = {(True, True): 1.2, (True, False): 1.2}
    times |= {(False, False): 1.0, (False, True): 2.0}
    chunks = calls(model, RegimeClock(times), 1 + 6 + 4 + 4 + 2)
    assert chunks == [8, *[1, 8] * 3, *[8] * 4, *[1] * 6]
    assert tuning.decisions(model) == {"key": 1}


def test_a_choice_its_own_run_confirms_stays_and_settles():
    model = mlp()
    times = {(True, True): 1.0, (True, False): 1.0}
    times |= {(False, False): 2.0, (False, True): 2.0}
    clock = RegimeClock(times)
    chunks = calls(model, clock, 1 + 6 + 4 + 2)
    assert chunks == [8, *[1, 8] * 3, *[1] * 6]
    (trial,) = tuning._TRIALS[model].values()
    assert trial.settled and not trial.steady and not trial.times
    # settled: no more timing, whatever the clock says now
    clock.times = dict.fromkeys(times, 0.0) | {(True, True): 9.0}
    assert calls(model, clock, 3) == [1, 1, 1]


def test_when_both_ways_ran_in_a_row_the_faster_run_wins_once_and_for_all():
    # the default ran 1.5 in a row (its trials 1.0), the loop 1.6 in a row
    # (its trials 1.2, and 1.2 on its run's first call, after a batched one,
    # which is not counted): back to the default, settled, no third run
    model = mlp()
    times = {(True, True): 1.6, (True, False): 1.2}
    times |= {(False, False): 1.0, (False, True): 1.5}
    chunks = calls(model, RegimeClock(times), 1 + 6 + 4 + 4 + 4)
    assert chunks == [8, *[1, 8] * 3, *[8] * 4, *[1] * 4, *[8] * 4]
    assert tuning.decisions(model) == {"key": 8}
    (trial,) = tuning._TRIALS[model].values()
    assert trial.settled


def test_one_fast_call_does_not_crown_a_way():
    # the fastest call of each decided, and one batched call that found its
    # memory mapped (5.3 ms among 9.5 and 10.0, against the loop's 5.6 to
    # 7.2) chose chunks, which in a row then ran at 10 ms; the medians decide
    model = mlp()
    decide_from(model, [1.0, 1.0, 1.0], [0.1, 2.0, 2.0])
    assert tuning.decisions(model) == {"key": 1}


def test_a_module_that_cannot_be_hashed_is_never_timed_and_has_no_decisions():
    # a dataclass module with eq=True has no __hash__: chunk_for gave it the
    # default untimed, and decisions() raised TypeError
    import dataclasses

    @dataclasses.dataclass(eq=True)
    class Unhashable(nn.Module):
        def __post_init__(self) -> None:
            super().__init__()

    model = Unhashable()
    assert tuning.chunk_for(model, "key", 4) == (4, tuning.untimed)
    assert tuning.decisions(model) == {}
