r"""Batched or looped VJPs: whichever is faster for this model, found by timing.

Exact GC takes :math:`k` input-side vector-Jacobian products (VJPs). They can
run batched, ``chunk`` at a time through one backward pass (larger matrix
products), or looped, one a pass. Which is faster depends on the model, the
machine and the allocator, and no rule of thumb gets it right everywhere. On
one 2-core AMD EPYC, for the MLP 40-256-256-10 at B=512 (``benchmarks/``):

- with glibc's default ``malloc`` settings the loop took 6.6 ms and chunks of
  10 took 12.7 ms: the batched pass's large blocks are handed back to the
  kernel and faulted in again on every call (:mod:`geocomplexity.malloc`);
- with the memory kept, 6.0 against 6.6 ms;
- on the deeper MLP 784-512×3-10 (B=256), chunks of 10 won both ways
  (29 against 33 ms), and on an Intel Xeon they won on the small MLP too.

So where the caller gives no ``chunk_size`` and the default would batch, the
first calls on a model alternate the two and time them, a run of calls of the
faster confirms it (or the other way's run wins), and later calls of the same
shapes take the choice (:func:`chunk_for`). Nothing is computed twice: each
timed call's result is the answer to that call. A measurement over a data set
decides within its first :data:`MAX_TIMED_CALLS` (15) batches; a single call
uses the default.

Only the loop is tried against the default, never a larger chunk: a loop
holds one copy of the activations where a chunk holds ``chunk`` of them, so
the trial can never run out of memory where the default did not.

The two ways agree up to rounding (the same products, summed in another
order), not always to the last bit. Where bit-for-bit repeatable numbers matter
the choice is not timed:

- with ``create_graph=True`` (a penalty): its parameter gradients differ
  between the two in the last bits (3·10⁻⁷ relative in float32 on an MLP), and
  training amplifies that, so a seeded run would not repeat;
- under :func:`fixed_chunks` (:func:`geocomplexity.training.fit` measures GC
  under it, and so does each run of an experiment, so that a seeded run gives
  the same numbers) or
  ``torch.use_deterministic_algorithms(True)``;
- where the caller passes ``chunk_size``.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from statistics import median

import torch
from torch import nn

__all__ = [
    "MAX_TIMED_CALLS",
    "chunk_for",
    "decisions",
    "fixed_chunks",
    "tuned",
    "untimed",
]

#: calls that time each way (the first call of a shape is a warm-up, untimed)
TRIALS_EACH = 3
#: the most calls of one key until its choice is settled: a warm-up (untimed),
#: the trials, and two runs of one way each (a first call, then
#: :data:`TRIALS_EACH` counted)
MAX_TIMED_CALLS = 1 + 2 * TRIALS_EACH + 2 * (TRIALS_EACH + 1)
#: the loop replaces the default only when this much faster (the default
#: batches because it won on the machines measured; a near tie keeps it)
MARGIN = 0.95

_FIXED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "geocomplexity_fixed_chunks", default=False
)
_LOCK = threading.Lock()


class _Trial:
    """The timings of one model at one key, and the chunk chosen.

    ``chosen`` is set once the alternating trials are over; ``settled`` once
    the chosen way's own run of calls (``steady``) has confirmed it.
    """

    __slots__ = ("calls", "chosen", "settled", "steady", "times")

    def __init__(self) -> None:
        self.calls = 0
        self.times: dict[int, list[float]] = {}
        self.steady: dict[int, list[float]] = {}
        self.chosen: int | None = None
        self.settled = False


#: model → key → trial; weak, so that a model's entries go with the model
_TRIALS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, _Trial]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.contextmanager
def fixed_chunks() -> Iterator[None]:
    """Within this block, exact GC batches its VJPs by the default rule, untimed.

    For numbers that repeat bit for bit from run to run (the timed choice
    depends on the machine's load). Per thread and per task (a context
    variable).
    """
    token = _FIXED.set(True)
    try:
        yield
    finally:
        _FIXED.reset(token)


def tuned() -> bool:
    """Whether a call here may choose its chunk by timing."""
    return not _FIXED.get() and not torch.are_deterministic_algorithms_enabled()


def chunk_for(
    model: nn.Module,
    key: Hashable,
    default: int,
    clock: Callable[[], float] | None = None,
) -> tuple[int, Callable[[Callable[[], torch.Tensor], torch.device], torch.Tensor]]:
    """The chunk for this call, and how to run it (timing it while undecided).

    Calls ``0`` (a warm-up), then alternately the loop and ``default``, each
    :data:`TRIALS_EACH` times; then the loop if its median call beats the
    default's median by :data:`MARGIN`, else the default (a median, as one
    call can be far off either way: a page fault, or a batched pass that
    found its memory mapped); then that way, one call and as many again in a
    row, timed to confirm the choice (:func:`_settle`).

    Args:
        model: whose calls are timed (held weakly).
        key: what else the time depends on (shapes, dtype, device, method).
        default: the chunk the default rule gives (above 1).
        clock: seconds, monotonic (default :func:`time.perf_counter`).

    Returns:
        ``(chunk, run)``: ``run(compute, device)`` returns ``compute()`` and,
        until the choice is settled, records how long it took. A default chunk
        that ran out of memory and started over with a smaller one is
        recorded with the time of its failed try, which speaks for the loop:
        the loop never runs out where a chunk did not.
    """
    with _LOCK:
        try:
            trials = _TRIALS.setdefault(model, {})
        except TypeError:  # not weakly referable: no trials
            return default, untimed
        trial = trials.setdefault(key, _Trial())
        if trial.settled:
            return trial.chosen, untimed  # type: ignore[return-value]
        if trial.chosen is None:
            call = trial.calls
            trial.calls += 1
            if call == 0:
                return default, untimed  # warm-up: first-call costs, untimed
            chunk, steady = (1 if call % 2 else default), False
        else:  # the chosen way, timed on a run of its own
            chunk, steady = trial.chosen, True
    clock = clock or _clock

    def run(compute: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        _sync(device)
        t0 = clock()
        result = compute()
        _sync(device)
        elapsed = clock() - t0
        with _LOCK:
            if steady and not trial.settled:
                trial.steady.setdefault(chunk, []).append(elapsed)
                _settle(trial, default)
            elif not steady and trial.chosen is None:
                trial.times.setdefault(chunk, []).append(elapsed)
                _decide(trial, default)
        return result

    return chunk, run


def _clock() -> float:
    return time.perf_counter()


def untimed(compute: Callable[[], torch.Tensor], _device: torch.device) -> torch.Tensor:
    """``compute()``: the ``run`` of a call whose chunk is not being timed."""
    return compute()


def _sync(device: torch.device) -> None:
    # asynchronous kernels: time the work, not its launch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":  # torch.mps, torch.xpu, ...: their own
        backend = getattr(torch, device.type, None)
        synchronize = getattr(backend, "synchronize", None)
        if synchronize is not None:
            synchronize()


def _faster(loop: float, batched: float, default: int) -> int:
    """The loop where it is faster by :data:`MARGIN`, else the default chunk."""
    return 1 if loop < MARGIN * batched else default


def _decide(trial: _Trial, default: int) -> None:
    loop, batched = trial.times.get(1, []), trial.times.get(default, [])
    if len(loop) >= TRIALS_EACH and len(batched) >= TRIALS_EACH:
        trial.chosen = _faster(median(loop), median(batched), default)


def _settle(trial: _Trial, default: int) -> None:
    """Confirm the chosen way by a run of its own calls, or try the other.

    Alternating calls time each way just after the other has run, and the
    allocator's state differs from that of a run of one way: glibc moves its
    mmap threshold as it frees large blocks, so that on the MLP
    40-256-256-10 (B=512) batched passes in a row took 6.5 ms (median) in a
    fresh process and 10.4 ms after a run of loop calls (5.4 ms each). A
    choice made on the trials is confirmed once the chosen way has run
    :data:`TRIALS_EACH` calls in a row (after one more, which follows a call
    of the trials and is not counted). Where its median is now slower than
    the other way's in the trials (by the margin), the other way runs as
    many in a row, and the faster of the two runs wins. At most two runs: no
    back and forth.
    """
    chosen = trial.chosen
    assert chosen is not None
    # a run's first call follows a call of the other way: its regime is the
    # trials', so it is not counted
    if len(trial.steady.get(chosen, [])) <= TRIALS_EACH:
        return
    other = default if chosen == 1 else 1
    runs = {c: median(t[1:]) for c, t in trial.steady.items() if len(t) > TRIALS_EACH}
    if other in runs:  # both ran in a row: the faster run wins
        trial.chosen, trial.settled = _faster(runs[1], runs[default], default), True
    else:
        best = {**{c: median(t) for c, t in trial.times.items()}, chosen: runs[chosen]}
        pick = _faster(best[1], best[default], default)
        trial.chosen, trial.settled = pick, pick == chosen
    if trial.settled:
        trial.times.clear()
        trial.steady.clear()


def decisions(model: nn.Module) -> dict[Hashable, int]:
    """The chunk chosen for each key of ``model`` decided so far (for reports).

    Chosen after the alternating trials, and possibly changed once by the
    run of calls that confirms it (:func:`chunk_for`).
    """
    with _LOCK:
        try:
            trials = _TRIALS.get(model, {})
        except TypeError:  # not weakly referable (chunk_for times none)
            return {}
        return {k: t.chosen for k, t in trials.items() if t.chosen is not None}
