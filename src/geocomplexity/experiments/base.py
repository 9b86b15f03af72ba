"""The experiment protocol and the function that reproduces one experiment.

An experiment is data plus machinery: :meth:`Experiment.runs` lists frozen
configs for a preset, :meth:`Experiment.execute` turns one config into a
JSON-serialisable result, :meth:`Experiment.analyze` computes claims and table
rows from all results, and :meth:`Experiment.plot` draws figures from results
alone (it never trains).
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import functools
import io
import json
import numbers
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geocomplexity.atomic import write_text
from geocomplexity.experiments.claims import Claim, write_claims
from geocomplexity.experiments.figures import pyplot
from geocomplexity.experiments.runner import Context, Run, run_sweep

__all__ = [
    "PRESETS",
    "Experiment",
    "Outcome",
    "describe_data",
    "every_seed",
    "reproduce_one",
    "result_rows",
    "seed_means",
]

PRESETS = ("smoke", "quick", "paper")


@dataclass(frozen=True)
class Outcome:
    """What reproducing one experiment produced.

    Attributes:
        name: the experiment.
        directory: where its files are.
        claims: the computed claims.
        figures: the figure files.
        data: the data folder the claims rest on, in words (see
            :func:`describe_data`); ``""`` without one.
    """

    name: str
    directory: Path
    claims: list[Claim]
    figures: list[Path]
    data: str = ""


class Experiment(abc.ABC):
    """Abstract base: subclasses are final and registered by name."""

    #: the command-line name, e.g. ``"init-depth"``
    name: str
    #: what the experiment claims, one sentence
    claim: str
    #: whether ``--dataset`` matters (the 1-D experiment uses its own data)
    uses_dataset: bool = True
    #: the data its claims are labelled with when ``--dataset`` does not matter
    data_label: str = ""
    #: whether it reads a local data folder (``--data-dir``)
    needs_data_dir: bool = False
    #: what a full data folder holds: its name and its train and test image
    #: counts, ``("CIFAR-10", 50000, 10000)``; claims on a smaller folder say so
    folder_data: tuple[str, int, int] | None = None
    #: the presets ``reproduce all`` runs it in
    in_all: tuple[str, ...] = PRESETS

    def check(self, context: Context) -> None:
        """Fail early, before any run, on what would fail every run.

        Raises:
            FileNotFoundError: a data folder it needs is missing.
            ValueError: that folder is malformed.
        """
        del context

    def data_fingerprint(self, context: Context) -> dict[str, str] | None:
        """What identifies the data a run reads outside its config, or ``None``.

        For data read from a folder (``context.data_dir``), which is not part
        of a run's config: ``{"fingerprint": ..., "folder": ...}``, stored in
        each record and compared before a stored run is reused, so that runs
        made on other data are never reused (:func:`run_sweep`'s ``data``).
        Generated data sets are fixed by the config: ``None``.
        """
        del context
        return None

    @abc.abstractmethod
    def runs(self, preset: str, dataset: str, seeds: int | None) -> list[Run]:
        """The sweep for a preset (``seeds`` overrides its seed count)."""

    @abc.abstractmethod
    def execute(self, run: Run, context: Context) -> dict[str, Any]:
        """One run's result (JSON-serialisable), on ``context.device``."""

    @abc.abstractmethod
    def analyze(
        self, records: Sequence[dict[str, Any]], dataset: str
    ) -> tuple[list[Claim], list[dict[str, Any]]]:
        """Claims and ``results.csv`` rows from the finished runs."""

    @abc.abstractmethod
    def plot(
        self, records: Sequence[dict[str, Any]], directory: Path, suffix: str
    ) -> list[Path]:
        """Draw the figures into ``directory`` as ``<figure><suffix>.png``."""


def result_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per run: its config and its scalar results.

    A training ``curve`` stays in the run file, out of ``results.csv``.

    Returns:
        ``[{**config, **result without "curve"}]`` in the order of ``records``.
    """
    return [
        {**r["config"], **{k: v for k, v in r["result"].items() if k != "curve"}}
        for r in records
    ]


def seed_means(
    rows: Sequence[dict[str, Any]], x: str, y: str
) -> tuple[list[Any], list[float]]:
    """The mean of ``y`` over the runs (seeds) at each value of ``x``.

    Returns:
        The sorted distinct ``x`` values and the mean ``y`` at each.
    """
    xs = sorted({r[x] for r in rows})
    return xs, [statistics.fmean(r[y] for r in rows if r[x] == v) for v in xs]


def every_seed(
    rows: Sequence[dict[str, Any]], x: str, keep: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """The kept runs at the values of ``x`` where every seed's run is kept.

    Seed means taken over whichever seeds are left at each value (a run that
    missed its target, a dead net) carry those seeds' own levels, and could
    rank one value above another that lies above it in every seed: the means
    are taken where each value rests on every seed of ``rows``.

    Returns:
        The kept runs at those values, in the order of ``rows``.
    """
    seeds = {r["seed"] for r in rows}
    kept = [r for r in rows if keep(r)]
    whole = {
        v
        for v in {r[x] for r in kept}
        if {r["seed"] for r in kept if r[x] == v} == seeds
    }
    return [r for r in kept if r[x] in whole]


def describe_data(
    experiment: Experiment,
    records: Sequence[dict[str, Any]],
    data: dict[str, str] | None,
) -> str:
    """The data folder ``records`` were made on, in words, for their claims.

    ``"CIFAR-10 from FOLDER (N+M images, sha256 ...)"`` from the records'
    ``data`` (the fingerprint begins with the image counts, see
    :func:`~geocomplexity.data.cifar10_with_fingerprint`); FOLDER is
    ``data``'s, the folder the sweep read, where its fingerprint is theirs
    (the data moved since). Flagged ``"; not the full CIFAR-10: N+M
    images"`` where N or M is below the full folder's counts, so claims on a
    generated folder are never read as evidence on the real one. Records
    without ``data`` (stored before fingerprints): ``"not recorded"``, or
    ``"; not recorded for K of R runs"`` after the others'.

    Returns:
        The description, ``""`` for an experiment without a data folder.
    """
    if experiment.folder_data is None:
        return ""
    name, full_train, full_test = experiment.folder_data
    made_on: dict[str, set[str]] = {}  # fingerprint -> the folders recorded
    unknown = 0
    for record in records:
        d = record.get("data")
        if not isinstance(d, dict) or not isinstance(d.get("fingerprint"), str):
            unknown += 1
            continue
        made_on.setdefault(d["fingerprint"], set()).add(str(d.get("folder", "?")))
    parts = []
    for fingerprint, folders in sorted(made_on.items()):
        if data is not None and data.get("fingerprint") == fingerprint:
            folders = {data["folder"]}
        text = f"{name} from {' or '.join(sorted(folders))} ({fingerprint})"
        counts = re.match(r"(\d+)\+(\d+) images", fingerprint)
        if counts is None:
            text += f"; not known to be the full {name}"
        elif int(counts[1]) < full_train or int(counts[2]) < full_test:
            text += f"; not the full {name}: {counts[1]}+{counts[2]} images"
        parts.append(text)
    if not parts:
        return "not recorded"
    if unknown:
        parts.append(f"not recorded for {unknown} of {len(records)} runs")
    return "; ".join(parts)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def reproduce_one(
    experiment: Experiment,
    out: Path,
    *,
    preset: str = "quick",
    dataset: str = "mnist1d",
    seeds: int | None = None,
    workers: int = 1,
    device: str = "cpu",
    data_dir: Path | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    progress: bool | None = None,
) -> Outcome:
    """Run (or resume) an experiment's sweep, then write its results and figures.

    Files: ``out/NAME/runs/*.json``, ``results.csv``, ``claims.json``,
    ``*.png``. Different presets and data sets share the run folder: a run is
    identified by its config, so nothing is computed twice.

    Args:
        experiment: what to reproduce.
        out: the output folder.
        preset: ``smoke``, ``quick`` or ``paper``.
        dataset: ``mnist1d`` or ``digits``.
        seeds: overrides the preset's seed count.
        workers: parallel processes.
        device: where runs train (``"auto"``: CUDA when present).
        data_dir: a local data folder, for experiments that need one.
        executor: ``"local"`` processes or ``"ray"`` tasks (see
            :func:`~geocomplexity.experiments.run_sweep`).
        ray_address: the Ray cluster to use; ``None`` starts a local one.
        progress: progress bars (``None``: on a terminal).

    Returns:
        The :class:`Outcome`.

    Raises:
        ImportError: matplotlib, which draws the figures, is missing (raised
            before any run).
        ValueError: ``seeds`` is not ``None`` or an integer >= 1.
    """
    from geocomplexity.training import resolve_device

    # 0 read as "the preset's count" (seeds or p["seeds"]), silently
    if seeds is not None and (
        not isinstance(seeds, numbers.Integral) or isinstance(seeds, bool) or seeds < 1
    ):
        raise ValueError(
            f"seeds must be an integer >= 1 (or None for the preset's), got {seeds!r}"
        )
    directory = out / experiment.name
    context = Context(str(resolve_device(device)), data_dir, directory / "runs")
    experiment.check(context)
    data = experiment.data_fingerprint(context)
    context = dataclasses.replace(context, data=data)  # checked where runs run
    pyplot()  # the figures need matplotlib: say so before the runs, not after
    runs = experiment.runs(preset, dataset, seeds)
    records = run_sweep(
        runs,
        functools.partial(experiment.execute, context=context),
        directory,
        workers=workers,
        progress=progress,
        desc=experiment.name,
        executor=executor,
        ray_address=ray_address,
        gpus_per_run=1.0 if context.device.startswith("cuda") else 0.0,
        data=data,
    )
    # an experiment with its own data (1-D, CIFAR-10) labels its claims itself
    label = dataset if experiment.uses_dataset else experiment.data_label
    claims, rows = experiment.analyze(records, label)
    # the data folder the claims rest on: a generated one is no CIFAR-10
    described = describe_data(experiment, records, data)
    claims = [dataclasses.replace(c, preset=preset, data=described) for c in claims]
    suffix = (
        "" if dataset == "mnist1d" or not experiment.uses_dataset else f"-{dataset}"
    )
    _write_csv(directory / f"results{suffix}.csv", rows)
    write_claims(directory / f"claims{suffix}.json", claims)
    # which runs the claims rest on: the report lists their configs alone
    write_text(
        directory / f"sweep{suffix}.json",
        json.dumps(
            {"preset": preset, "dataset": label, "keys": [r["key"] for r in records]},
            indent=1,
        ),
    )
    figures = experiment.plot(records, directory, suffix)
    return Outcome(experiment.name, directory, claims, figures, described)
