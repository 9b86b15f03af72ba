"""Resumable sweeps: one frozen config per run, one JSON file per finished run.

A run is identified by the hash of its config, so its result lives at
``DIR/NAME/runs/<hash>.json``, written atomically (temporary file, then
rename). Rerunning a sweep skips finished runs; a sweep interrupted by Ctrl-C or
``kill -9`` resumes with nothing lost and nothing recomputed, and removes the
temporary files the killed writes left. ``workers > 1``
runs runs in parallel processes.

Data read from a folder is not in the config (moving it recomputes nothing):
its fingerprint is stored in each record, and a stored run made on other data
stops the sweep (:class:`DataMismatch`) instead of being reused.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import platform
import socket
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from geocomplexity import malloc
from geocomplexity.atomic import (
    claimed,
    remove_released_claims,
    remove_stale_temporaries,
    write_text,
)
from geocomplexity.tuning import fixed_chunks

__all__ = [
    "ClusterUnreachable",
    "Context",
    "DataMismatch",
    "Run",
    "load_runs",
    "run_sweep",
]


@dataclass(frozen=True)
class Run:
    """One run of an experiment: its name, its parameters and its seed.

    Attributes:
        experiment: the experiment's name (``"init-depth"``).
        params: JSON-serialisable parameters, as sorted ``(key, value)`` pairs so
            the config is hashable and its hash is stable.
        seed: the run's seed.
    """

    experiment: str
    params: tuple[tuple[str, Any], ...] = field(default=())
    seed: int = 0

    @classmethod
    def make(cls, experiment: str, seed: int = 0, **params: Any) -> Run:
        """Build a run from keyword parameters.

        Returns:
            The run; list values become tuples so the run stays hashable.
        """
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        return cls(experiment, tuple(sorted(frozen.items())), seed)

    @property
    def config(self) -> dict[str, Any]:
        """The config as a plain dict (what is hashed and stored)."""
        return {"experiment": self.experiment, "seed": self.seed, **dict(self.params)}

    @property
    def key(self) -> str:
        """16 hex digits of the SHA-256 of the canonical JSON config."""
        text = json.dumps(self.config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __getitem__(self, name: str) -> Any:
        """A parameter's value (``run["width"]``)."""
        return dict(self.params)[name]


@dataclass(frozen=True)
class Context:
    """Where and with what a run executes: not part of its config or its hash.

    A finished run is found again whatever the device or the data's folder, so
    moving CIFAR-10 or switching to a GPU never recomputes a run; the data's
    fingerprint, stored beside the result, keeps runs made on other data in
    that folder from being reused (:func:`run_sweep`'s ``data``).

    Attributes:
        device: ``"cpu"``, ``"cuda"``, ... (``"auto"`` is resolved before).
        data_dir: a local data folder (CIFAR-10), when an experiment needs one.
        folder: the sweep's ``runs`` folder; long runs keep checkpoints there.
        data: the data the sweep is made on, as the driver read it
            (``{"folder", "fingerprint"}``, see
            :meth:`Experiment.data_fingerprint`): a run that reads other data
            where it executes (a Ray node's own copy of the folder) stops
            before it trains.
    """

    device: str = "cpu"
    data_dir: Path | None = None
    folder: Path | None = None
    data: dict[str, str] | None = None

    def checkpoint(self, run: Run) -> Path | None:
        """Where ``run`` keeps its checkpoint (``None`` without a folder)."""
        return None if self.folder is None else self.folder / f"{run.key}.pt"


def _versions() -> dict[str, str]:
    from geocomplexity import __version__

    return {
        "geocomplexity": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.platform(),
    }


def _record(
    fn: Callable[[Run], dict[str, Any]], run: Run, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one config: its record, not yet stored (with ``data``, if given).

    Exact GC batches its VJPs by the default rule, untimed
    (:func:`geocomplexity.tuning.fixed_chunks`): batched and looped VJPs
    differ in the last bits, and a run's numbers must repeat from its seed
    whatever the machine's load.
    """
    with fixed_chunks():
        result = fn(run)
    return {
        "config": run.config,
        "key": run.key,
        "versions": _versions(),
        **({} if data is None else {"data": data}),
        "result": result,
    }


def _store(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write ``record`` to ``path``; return it as a resumed sweep will read it.

    JSON has no tuples (a list parameter is frozen into one): the record handed
    on is the file's, so an uninterrupted sweep and its rerun analyse the same
    records and write the same ``results.csv``.
    """
    text = json.dumps(record, indent=1, allow_nan=True)
    write_text(path, text)
    return json.loads(text)


def _execute(
    fn: Callable[[Run], dict[str, Any]],
    run: Run,
    path: Path,
    wait: bool = True,
    data: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Run one config and store it; module-level so worker processes can call it.

    Under the run's claim (:func:`geocomplexity.atomic.claimed`), so that
    sweeps sharing a folder compute it once: a record another sweep stored
    meanwhile is read, not recomputed.

    Returns:
        The record, or ``None`` without ``wait`` when another process is
        computing the run now.

    Raises:
        DataMismatch: another sweep stored the run meanwhile, on other data.
    """
    with claimed(path, wait=wait) as mine:
        if not mine:
            return None
        return _stored(path, run, data) or _store(_record(fn, run, data), path)


def _stored(
    path: Path, run: Run, data: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """``run``'s record at ``path`` if one is there (another sweep stored it).

    Raises:
        DataMismatch: it was made on other data than ``data`` says.
    """
    record = _read_record(path)
    if record is None or record["key"] != run.key:
        return None
    # a record without a fingerprint, of a sweep before them, is taken as
    # run_sweep takes it (its warning is given there, once)
    _check_data([record], data, path.parent, warn=False)
    return record


class DataMismatch(ValueError):
    """Stored runs were made on other data than the sweep reads now."""


def _stored_data(record: dict[str, Any]) -> dict[str, Any] | None:
    """The ``data`` a record was made on, ``None`` if it has none (older)."""
    data = record.get("data")
    return data if isinstance(data, dict) and "fingerprint" in data else None


def _check_data(
    records: Sequence[dict[str, Any]],
    data: dict[str, Any] | None,
    folder: Path,
    warn: bool = True,
) -> None:
    """Refuse to reuse ``records`` made on other data than ``data``.

    Reusing them would mix two data sets in one sweep's results, recomputing
    them would overwrite results someone may want: neither is done silently.
    Records without a fingerprint (stored before fingerprints were) are
    accepted, with a warning: a resumed sweep of days of training keeps
    its runs, which were almost surely made on the folder it is resumed on.

    Raises:
        DataMismatch: naming both data and the fix.
    """
    if data is None:
        return
    made_on = [(r, _stored_data(r)) for r in records]
    other = [
        (r, d)
        for r, d in made_on
        if d is not None and d["fingerprint"] != data["fingerprint"]
    ]
    if other:
        seen = {f"{d.get('folder', 'a folder')} ({d['fingerprint']})" for _, d in other}
        keys = sorted(r["key"] for r, _ in other)
        names = ", ".join(f"{k}.json" for k in keys[:3])
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        raise DataMismatch(
            f"{len(other)} of the runs stored in {folder} were made on other "
            f"data: {'; '.join(sorted(seen))}, not on "
            f"{data.get('folder', 'this data')} ({data['fingerprint']}); they "
            "are neither reused nor overwritten. Write this sweep elsewhere "
            "(another --out), or delete those runs to compute them again on "
            f"this data: {names}{more} (and their .pt checkpoints)"
        )
    unknown = sum(d is None for _, d in made_on)
    if unknown and warn:
        warnings.warn(
            f"{unknown} of the runs stored in {folder} do not record the data "
            "they were made on (stored before data fingerprints): reused as "
            f"made on {data.get('folder', 'this data')}; delete them if they "
            "were not",
            stacklevel=3,
        )


def _ray_record(
    fn: Callable[[Run], dict[str, Any]],
    run: Run,
    threads: int,
    malloc_setting: tuple[int, int] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    _start_worker(threads, malloc_setting)  # as a local worker process would have
    return _record(fn, run, data)


class ClusterUnreachable(ConnectionError):
    """The Ray cluster named by ``ray_address`` did not answer."""


#: The fix named by every :class:`ClusterUnreachable`
_CLUSTER_FIX = (
    "check that it is up (`ray status` on its head node) and that the address "
    "is its head node's: HOST:PORT of the GCS (6379 unless changed) or "
    "ray://HOST:PORT of Ray Client (10001 unless changed)"
)

#: Seconds a cluster's port has to accept a connection
_CONNECT_TIMEOUT = 3.0


def _check_reachable(address: str) -> None:
    """Raise :class:`ClusterUnreachable` if nothing accepts at ``address``.

    ``ray.init`` on a HOST:PORT where nothing listens does not fail: it logs
    "Failed to connect to GCS" and retries for minutes (still retrying at
    two), so one TCP connect, at most ``_CONNECT_TIMEOUT`` seconds, comes
    first. Only ``HOST:PORT`` and ``ray://HOST:PORT`` are checked; ``auto``
    and a client-builder module's ``scheme://`` are left to Ray.
    """
    if address.startswith("ray://"):
        rest = address.removeprefix("ray://")
    elif "://" in address:
        return
    else:
        rest = address
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not port.isdigit():
        return  # "auto", or a form Ray reads (and refuses) itself
    try:
        socket.create_connection(
            (host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT
        ).close()
    except OSError as err:  # refused, timed out, a host that does not resolve
        raise ClusterUnreachable(
            f"no Ray cluster answered at --ray-address {address} "
            f"({err.strerror or err or type(err).__name__}); {_CLUSTER_FIX}"
        ) from None


def _ray(address: str | None) -> Any:
    """Ray, connected: to ``address``, or to a local instance started here."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "--executor ray needs Ray: pip install 'geocomplexity[ray]'"
        ) from None
    if not ray.is_initialized():
        if address is None:
            ray.init(
                # a new local Ray, as documented: with address=None, ray.init
                # connects to RAY_ADDRESS or a `ray start` cluster on this
                # machine instead, and refuses num_cpus there (ValueError)
                address="local",
                num_cpus=os.cpu_count() or 1,  # tasks reserve their share
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            _check_reachable(address)  # ray.init would retry for minutes
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except ConnectionError as err:  # "ray client connection timeout"
                raise ClusterUnreachable(
                    f"no Ray cluster answered at --ray-address {address} ({err}); "
                    f"{_CLUSTER_FIX}"
                ) from None
        atexit.register(ray.shutdown)
    return ray


#: Ray runs claimed and in flight at once: each holds a lock file open
_RAY_WINDOW = 256


def _run_ray(
    todo: Sequence[Run],
    fn: Callable[[Run], dict[str, Any]],
    folder: Path,
    workers: int,
    address: str | None,
    gpus: float,
    on_done: Callable[[dict[str, Any]], None],
    data: dict[str, Any] | None = None,
) -> None:
    """Each run a Ray task; the driver stores each record as it arrives.

    The driver writes the run files (a cluster's nodes need not share a disk
    with it); a run whose task is lost is simply not stored, so it reruns.
    The driver holds each run's claim (:func:`geocomplexity.atomic.claimed`)
    while its task runs, as a local sweep does, so that sweeps sharing the
    folder, Ray or local, compute each run once: a run another sweep is
    computing is waited for at the end and its record read. A run that fails
    stops no other: the rest finish and are stored, and the first failure is
    raised at the end. On Ctrl-C the runs already finished are stored and the
    rest are cancelled.
    """
    ray = _ray(address)
    # locally, `workers` runs at a time with their share of the cores, as the
    # process pool has; on a cluster (whose nodes this process cannot see) one
    # core per run, and Ray packs as many runs as the nodes have cores
    threads = 1 if address else _threads(workers)
    task = ray.remote(num_cpus=threads, num_gpus=gpus)(_ray_record)
    setting = malloc.tuned()
    pending: dict[Any, tuple[Run, contextlib.ExitStack]] = {}
    failures: list[Exception] = []
    queue = collections.deque(todo)
    busy: list[Run] = []  # claimed by another sweep: waited for last
    waiting = False  # the queue holds those runs now: wait for their claims

    def submit(run: Run) -> None:
        path = folder / f"{run.key}.json"
        claim = contextlib.ExitStack()
        if not claim.enter_context(claimed(path, wait=waiting)):
            busy.append(run)
            return
        try:
            record = _stored(path, run, data)  # stored meanwhile by another sweep
            if record is None:
                pending[task.remote(fn, run, threads, setting, data)] = (run, claim)
                return
        except BaseException:
            # DataMismatch, or a task Ray refuses (an fn it cannot pickle):
            # a claim in no `pending` is let go by no one but here, and held
            # as long as the traceback lives (a notebook keeps the last one)
            claim.close()
            raise
        claim.close()
        on_done(record)

    def collect(ref: Any) -> None:
        run, claim = pending.pop(ref)
        with claim:  # let go once stored (or failed: the next takes it)
            try:
                record = ray.get(ref)
            except Exception as err:  # this run failed: the others are kept
                failures.append(err)
                return
            on_done(_store(record, folder / f"{run.key}.json"))

    try:
        while queue or pending or busy:
            if not queue and not pending:  # only others' runs left: wait for them
                queue, busy, waiting = collections.deque(busy), [], True
            while queue and len(pending) < _RAY_WINDOW:
                submit(queue.popleft())
            if pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    collect(ref)
    except BaseException:
        # Ctrl-C: keep what has finished, stop what is still running
        try:
            if pending:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                for ref in ready:
                    collect(ref)
        finally:
            # also when storing one failed here (a full disk fails them all):
            # a claim not let go is held while the traceback lives
            for ref, (_, claim) in pending.items():
                with claim:
                    ray.cancel(ref, force=True)
        raise
    if failures:
        if len(failures) > 1 and hasattr(failures[0], "add_note"):  # Python 3.11+
            failures[0].add_note(f"{len(failures) - 1} other run(s) failed too")
        raise failures[0]


def load_runs(directory: Path) -> dict[str, dict[str, Any]]:
    """Every finished run in ``directory/runs``, keyed by config hash.

    Unreadable files (a run killed mid-write leaves only a temporary file, never
    a broken JSON, but a disk can still fail: truncated, not UTF-8, or JSON
    that is not a run's record) are skipped, so they rerun.

    Returns:
        ``{key: record}``.
    """
    runs = {}
    for path in sorted((directory / "runs").glob("*.json")):
        record = _read_record(path)
        if record is not None:
            runs[record["key"]] = record
    return runs


def _read_record(path: Path) -> dict[str, Any] | None:
    """The run record in ``path``, or ``None`` if it is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # JSONDecodeError, UnicodeDecodeError
        return None
    if (
        isinstance(record, dict)
        and isinstance(record.get("key"), str)
        # the analysis reads both: a record without them would stop it
        # with a KeyError instead of rerunning the run
        and isinstance(record.get("config"), dict)
        and isinstance(record.get("result"), dict)
    ):
        return record
    return None


# worker count -> (the malloc setting its workers started with, the pool)
_POOLS: dict[int, tuple[tuple[int, int] | None, ProcessPoolExecutor]] = {}


def _threads(workers: int) -> int:
    """Torch threads per run when ``workers`` runs share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // workers)


def _start_worker(threads: int, malloc_setting: tuple[int, int] | None) -> None:
    """A spawned worker's set-up: its share of the cores, the parent's malloc."""
    torch.set_num_threads(threads)
    if malloc_setting is not None:
        malloc.tune_malloc(*malloc_setting)


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool kept for the life of the process.

    Sweeps run one after another (``reproduce all``) share it, so each worker
    imports torch and builds its data sets once, not once per experiment. A
    pool whose workers started with another malloc setting than this process
    has now is replaced: workers always run as the parent does.
    """
    setting = malloc.tuned()
    if workers in _POOLS:
        started_with, pool = _POOLS[workers]
        if started_with == setting:
            return pool
        pool.shutdown(cancel_futures=True)
        atexit.unregister(pool.shutdown)  # or atexit would hold it until exit
    # spawn, not fork: a forked child of a process whose OpenMP pool is running
    # can deadlock in its first parallel region
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(_threads(workers), setting),
    )
    atexit.register(pool.shutdown, cancel_futures=True)
    _POOLS[workers] = setting, pool
    return pool


def _discard(
    workers: int, pool: ProcessPoolExecutor, stop_workers: bool = False
) -> None:
    """Forget ``pool`` (the next sweep starts a new one) and shut it down.

    With ``stop_workers`` its workers are terminated: the runs they hold are
    unfinished (one caught while its worker stores it reruns), and a
    temporary a terminated write leaves is removed by the next sweep.
    """
    if _POOLS.get(workers, (None, None))[1] is pool:
        del _POOLS[workers]
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    # the exit needs no second shutdown, and the registration held the pool
    # (its queues, its pending work) for the life of the process: one more
    # for every worker that died and every Ctrl-C
    atexit.unregister(pool.shutdown)
    if stop_workers:
        for process in processes:
            process.terminate()


def run_sweep(
    runs: Sequence[Run],
    fn: Callable[[Run], dict[str, Any]],
    directory: Path,
    *,
    workers: int = 1,
    progress: bool | None = None,
    desc: str = "runs",
    executor: str = "local",
    ray_address: str | None = None,
    gpus_per_run: float = 0.0,
    data: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Execute the runs not yet finished under ``directory`` and return them all.

    Sweeps that share ``directory`` (two processes, or the same command on
    several machines over a shared disk) split its runs: each run is computed
    once, by whichever sweep claims it first, and the others read its record
    (a Ray sweep's driver holds the claims of the runs its tasks compute).

    Args:
        runs: the sweep's configs.
        fn: ``fn(run) -> result dict`` (JSON-serialisable). With ``workers > 1``
            it must be importable (a module-level function).
        directory: the experiment's folder; results go to ``directory/runs``.
        workers: parallel processes (1 runs in this process); with a local
            Ray, runs at a time (each reserves its share of the cores).
        progress: progress bar over runs; ``None`` on a terminal.
        desc: the progress bar's label.
        executor: ``"local"`` (this process or a process pool) or ``"ray"``
            (one Ray task per run; the same results in the same run files).
        ray_address: a Ray cluster's address; ``None`` starts a local Ray.
        gpus_per_run: GPUs each Ray task reserves.
        data: what identifies the data the runs read outside their configs
            (a folder's): ``{"fingerprint": str, "folder": str}``, stored in
            each record; a stored run with another fingerprint is not reused.

    Returns:
        One record per run, in the order of ``runs``: ``{"config", "key",
        "versions", "result"}`` (and ``"data"`` with ``data``).

    Raises:
        ValueError: two runs share a config, or an unknown executor.
        DataMismatch: a stored run of the sweep was made on other data
            (before any run, or when another sweep stores one meanwhile).
        ImportError: ``executor="ray"`` without Ray installed.
        ClusterUnreachable: no Ray cluster answered at ``ray_address``.
    """
    from tqdm.auto import tqdm

    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor {executor!r}; choose 'local' or 'ray'")
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError("the sweep lists the same config twice")
    folder = directory / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    # what writers killed mid-write left (a checkpoint's is a network's size);
    # a live writer's, another sweep's into the same folder, stays
    for place in (folder, directory):
        remove_stale_temporaries(place)
    # the claims of runs stored by a sweep killed before it let them go
    remove_released_claims(folder)
    done = load_runs(directory)
    _check_data([done[k] for k in keys if k in done], data, folder)
    todo = [r for r in runs if r.key not in done]
    bar = tqdm(
        total=len(runs),
        initial=len(runs) - len(todo),
        desc=desc,
        unit="run",
        disable=None if progress is None else not progress,
    )

    def finished(record: dict[str, Any]) -> None:
        done[record["key"]] = record
        bar.update()

    try:
        if executor == "ray" and todo:
            _run_ray(
                todo, fn, folder, workers, ray_address, gpus_per_run, finished, data
            )
        elif workers <= 1 or len(todo) <= 1:
            # runs another sweep into this folder is computing now are taken
            # last, waiting for it: its record is read, not recomputed
            busy = []
            for run in todo:
                path = folder / f"{run.key}.json"
                record = _execute(fn, run, path, wait=False, data=data)
                if record is None:
                    busy.append(run)
                else:
                    finished(record)
            for run in busy:
                finished(_execute(fn, run, folder / f"{run.key}.json", data=data))
        else:
            pool = _pool(workers)
            futures = {
                pool.submit(
                    _execute, fn, run, folder / f"{run.key}.json", False, data
                ): run
                for run in todo
            }
            waits = []
            try:
                for fut in as_completed(list(futures)):
                    record = fut.result()
                    if record is not None:
                        finished(record)
                        continue
                    run = futures[fut]  # busy in another sweep: wait for it
                    path = folder / f"{run.key}.json"
                    waits.append(pool.submit(_execute, fn, run, path, True, data))
                    futures[waits[-1]] = run
                for fut in as_completed(waits):
                    finished(fut.result())
            except BrokenProcessPool:
                # a worker died (out of memory, kill -9): the pool takes no
                # more work, so the next sweep of this process gets a new one
                _discard(workers, pool)
                raise
            except BaseException as err:
                # drop what has not started; what has (and what the pool's
                # queue holds, one per worker and one more) cannot be
                left = [f for f in futures if not f.cancel() and not f.done()]
                if not isinstance(err, Exception):
                    # Ctrl-C: those started after it, each to its end, before
                    # the process could exit
                    _discard(workers, pool, stop_workers=True)
                elif left:
                    # a run failed: the others run to their end and are
                    # stored before the process exits, which after the
                    # traceback looked like a hang for as long as a run takes
                    print(
                        f"{type(err).__name__} in a run; {len(left)} other "
                        f"run{'s' if len(left) > 1 else ''} already handed to "
                        "the workers finish and are stored before the process "
                        "exits (Ctrl-C stops them; a rerun resumes the sweep)",
                        file=sys.stderr,
                        flush=True,
                    )
                raise
    finally:
        bar.close()
    return [done[k] for k in keys]
