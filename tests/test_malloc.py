"""glibc malloc tuning: the setting takes, and it stops the page-fault churn."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from geocomplexity import malloc
from geocomplexity.experiments import runner
from geocomplexity.experiments.runner import Run, run_sweep

CHURN = """
import json, resource, sys
import torch
from geocomplexity import malloc
# glibc's starting thresholds (128 KiB), pinned: its adaptive default reuses or
# returns blocks depending on the heap's history, so it churns only sometimes
low = 128 << 10
ok = malloc.tune_malloc() if sys.argv[1] == "tuned" else malloc.tune_malloc(low, low)
def cycle():  # four 8 MiB blocks live at once, touched, then freed: autograd's
    blocks = [torch.empty(2 << 20).fill_(1.0) for _ in range(4)]  # pattern
    del blocks
for _ in range(3):  # warm up: the heap grows to hold the blocks once
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"ok": ok, "faults": after - before}))
"""


def churn(setting: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, setting],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(not malloc.is_glibc(), reason="mallopt is glibc's")
def test_tuned_malloc_reuses_freed_blocks_instead_of_faulting_them_in():
    default, tuned = churn("default"), churn("tuned")
    assert default["ok"] is True and tuned["ok"] is True
    # at glibc's starting thresholds each block is mapped afresh and faulted
    # in: at least once per block (4 x 2048 times with 4 KiB pages, fewer with
    # huge pages); tuned, the freed blocks are reused
    assert default["faults"] >= 10 * 4
    assert tuned["faults"] * 20 < default["faults"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mmap_threshold": 0}, "positive"),
        ({"trim_threshold": 2**31}, "below 2"),
        ({"mmap_threshold": 64 << 20}, "ceiling"),
        ({"mmap_threshold": 1.5}, "positive"),
        ({"trim_threshold": True}, "positive"),
    ],
)
def test_bad_thresholds_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        malloc.tune_malloc(**kwargs)


@pytest.mark.skipif(not malloc.is_glibc(), reason="mallopt is glibc's")
def test_spawned_workers_repeat_the_parents_setting():
    import torch

    from geocomplexity.experiments import runner

    threads = torch.get_num_threads()
    try:
        runner._start_worker(1, (16 << 20, 1 << 29))
        assert malloc.tuned() == (16 << 20, 1 << 29)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        malloc.tune_malloc()


def _worker_setting(run: Run) -> dict:
    import torch

    return {
        "tuned": list(malloc.tuned() or ()),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }


@pytest.mark.skipif(not malloc.is_glibc(), reason="mallopt is glibc's")
def test_spawned_pool_workers_run_with_the_parents_current_setting(
    tmp_path, monkeypatch
):
    """Real spawned workers, before and after the parent's setting changes.

    The second sweep must not reuse the first sweep's workers, which started
    with the parent's earlier setting.
    """
    runs = [Run.make("toy", 0, x=i) for i in range(2)]
    seen = []
    for setting in (None, (16 << 20, 1 << 29)):
        # as if tune_malloc had (or had not) run here; the parent's own
        # malloc is left alone
        monkeypatch.setattr(malloc, "_applied", setting)
        records = run_sweep(
            runs, _worker_setting, tmp_path / str(setting), workers=2, progress=False
        )
        results = [r["result"] for r in records]
        assert all(r["tuned"] == list(setting or ()) for r in results)
        assert all(r["pid"] != os.getpid() for r in results)
        assert all(r["threads"] == runner._threads(2) for r in results)
        seen.append({r["pid"] for r in results})
    assert not seen[0] & seen[1], "the second sweep reused the first's workers"
