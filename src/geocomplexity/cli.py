"""The ``geocomplexity`` command: list, reproduce and report the paper's claims.

Examples (``python -m geocomplexity`` runs it too)::

    geocomplexity list
    geocomplexity reproduce init-depth --preset smoke --out results
    geocomplexity reproduce all --preset quick --out results
    geocomplexity report results
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from geocomplexity.data import DATASETS
    from geocomplexity.experiments import EXPERIMENTS, PRESETS

    parser = argparse.ArgumentParser(
        prog="geocomplexity",
        description="Reproduce the claims of 'Why neural networks find simple "
        "solutions: the many regularizers of geometric complexity'.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="name the experiments and what each claims")
    rep = sub.add_parser("reproduce", help="run an experiment (resumable)")
    rep.add_argument(
        "name",
        choices=[*EXPERIMENTS, "all"],
        help="an experiment, or all of them then the report",
    )
    rep.add_argument(
        "--preset",
        choices=PRESETS,
        default="quick",
        help="smoke: seconds; quick: minutes (default); paper: more",
    )
    rep.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="the data set of the experiments that take one (default: mnist1d)",
    )
    rep.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        help="output folder (default: results)",
    )
    rep.add_argument(
        "--seeds",
        type=_positive,
        default=None,
        help="seeds per configuration (default: the preset's)",
    )
    rep.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="runs in parallel processes (default: min(4, cores) on the CPU, "
        "1 on a GPU)",
    )
    rep.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where runs train: auto (CUDA when present, the default), cpu, cuda",
    )
    rep.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the CIFAR-10 python-version folder (cifar-10-batches-py), for "
        "resnet-double-descent (in `all` with --preset paper)",
    )
    rep.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local processes (default) or one Ray task per run "
        "(pip install 'geocomplexity[ray]')",
    )
    rep.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="a Ray cluster's address (default: start a local Ray)",
    )
    rep.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned (default): glibc keeps freed memory for reuse instead of "
        "page-faulting it back in, faster CPU autograd (geocomplexity.malloc); "
        "default: glibc's own settings",
    )
    rep.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 if any claim fails (after every run, claim and the report "
        "are written); by default a failing claim is a result, exit 0",
    )
    report = sub.add_parser("report", help="write DIR/report.html and print claims")
    report.add_argument("dir", type=Path, help="a folder `reproduce` wrote (its --out)")
    return parser


def _default_workers() -> int:
    # the quick preset's models are small: one thread per process and one
    # process per core beats one process using every core
    return max(1, min(4, os.cpu_count() or 1))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ray_address_problem(address: str) -> str | None:
    """Why ``address`` is no Ray address (``None`` when it looks like one).

    Ray reads ``host:port`` (the head node's GCS port), ``ray://host:port``
    (Ray Client), ``auto`` and ``module://...`` (a client-builder package's
    own form, left to it); anything else failed deep in ``ray.init`` with a
    traceback ("Invalid address format: head"), and a port out of range
    (``10.0.0.5:99999``) was still tried for minutes.
    """
    if address == "auto":
        return None
    scheme = address.split("://")[0] if "://" in address else "ray"
    if scheme in ("http", "https"):  # the dashboard's, not the cluster's
        return f"Ray takes no {scheme}:// address (a dashboard's)"
    if scheme != "ray":  # a client-builder module's (anyscale://): its own rules
        return None
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")  # [IPv6]:port
    if not colon or not host.strip("[]") or (":" in host and not bracketed):
        return "no HOST:PORT in it"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"its port {port!r} is not a number from 1 to 65535"
    return None


#: The module each data set's loader imports, and the package that brings it
#: (both in the ``data`` extra).
_DATA_PACKAGES = {
    "mnist1d": ("mnist1d.data", "mnist1d"),
    "digits": ("sklearn.datasets", "scikit-learn"),
}


def _missing_data_package(dataset: str) -> str | None:
    """The package ``dataset`` needs that cannot be imported, else ``None``."""
    import importlib

    if dataset not in _DATA_PACKAGES:
        return None
    module, package = _DATA_PACKAGES[dataset]
    try:
        importlib.import_module(module)
    except ImportError:
        return package
    return None


def _error(message: str) -> int:
    print(f"geocomplexity: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script.

    Returns:
        The exit status: 0 on success, 2 for bad arguments, a missing folder
        or package (matplotlib, a data set's), an output folder that cannot
        be made or a Ray cluster that does not answer, 130 for Ctrl-C during
        ``reproduce`` (the finished runs stored).
    """
    args = _parser().parse_args(argv)  # exits with status 2 on bad arguments
    from geocomplexity.experiments import EXPERIMENTS
    from geocomplexity.experiments.report import (
        claims_table,
        collect_claims,
        write_report,
    )

    if args.command == "list":
        width = max(map(len, EXPERIMENTS))
        for name, exp in EXPERIMENTS.items():
            note = " [needs --data-dir; in `all` at --preset paper]"
            print(f"{name:{width}s}  {exp.claim}{note if exp.needs_data_dir else ''}")
        return 0
    if args.command == "report":
        if not args.dir.is_dir():
            print(f"geocomplexity: error: no such folder: {args.dir}", file=sys.stderr)
            return 2
        try:
            path = write_report(args.dir)
        except (ValueError, OSError) as err:  # a read-only folder: OSError
            return _error(str(err))
        print(claims_table(collect_claims(args.dir)))
        print(f"\nreport: {path}")
        return 0
    import torch

    from geocomplexity.experiments import Context
    from geocomplexity.training import resolve_device

    # on a Ray cluster the runs train on its nodes: the driver may have no GPU
    remote = args.executor == "ray" and args.ray_address is not None
    if args.device == "cuda" and not torch.cuda.is_available() and not remote:
        return _error("--device cuda, but torch sees no CUDA device; use --device cpu")
    device = str(resolve_device(args.device))
    if args.name == "all":
        names = [n for n, e in EXPERIMENTS.items() if args.preset in e.in_all]
        for n in EXPERIMENTS.keys() - set(names):
            print(f"{n}: not in `all` at --preset {args.preset}; run it by name")
    else:
        names = [args.name]
    # an option the chosen experiments do not read would be silently ignored
    if args.name != "all" and args.dataset is not None:
        exp = EXPERIMENTS[args.name]
        if not exp.uses_dataset:
            return _error(
                f"--dataset {args.dataset}: {args.name} does not take a data set "
                f"(it runs on {exp.data_label or 'its own data'}); drop --dataset"
            )
    if args.data_dir is not None and not any(
        EXPERIMENTS[n].needs_data_dir for n in names
    ):
        readers = [n for n, e in EXPERIMENTS.items() if e.needs_data_dir]
        where = f"`all` at --preset {args.preset}" if args.name == "all" else args.name
        return _error(
            f"--data-dir {args.data_dir}: {where} reads no data folder (only "
            f"{', '.join(readers)} does); drop --data-dir"
        )
    # every check before any run: a bad folder fails in a second, not an hour in
    try:
        from geocomplexity.experiments.figures import pyplot

        pyplot()  # each experiment ends with its figures
    except ImportError as err:
        return _error(str(err))
    # the data sets' packages are an extra too: without one every run failed
    dataset = args.dataset or "mnist1d"
    if any(EXPERIMENTS[n].uses_dataset for n in names):
        missing = _missing_data_package(dataset)
        if missing is not None:
            return _error(
                f"--dataset {dataset} needs {missing}, which is not installed: "
                "pip install 'geocomplexity[data]'"
            )
    for name in names:
        try:
            EXPERIMENTS[name].check(Context(device, args.data_dir))
        except (OSError, ValueError) as err:
            if args.data_dir is None or "--data-dir" in str(err):
                return _error(str(err))
            return _error(f"--data-dir {args.data_dir}: {err}")
        except Exception as err:  # a planted pickle raises UnpicklingError
            return _error(f"--data-dir {args.data_dir}: {err}")
    if args.malloc == "tuned":
        from geocomplexity.malloc import tune_malloc

        tune_malloc()  # spawned worker processes repeat it (runner._start_worker)
    workers = args.workers or (1 if device == "cuda" else _default_workers())
    if args.executor == "ray":
        import importlib.util

        problem = args.ray_address and _ray_address_problem(args.ray_address)
        if problem:
            return _error(
                f"--ray-address {args.ray_address}: {problem}; give the head "
                "node's HOST:PORT (its GCS port, 6379 unless changed: "
                "10.0.0.5:6379), ray://HOST:PORT for Ray Client (port 10001 "
                "unless changed), or auto for the cluster this machine is in"
            )
        if importlib.util.find_spec("ray") is None:
            return _error(
                "--executor ray needs Ray, which is not installed: "
                "pip install 'geocomplexity[ray]'"
            )
    elif args.ray_address is not None:
        return _error("--ray-address needs --executor ray")
    # an experiment's own folder (results/init-depth) as --out: its runs
    # would all be computed again a level down, the finished ones unread
    if (args.out / "runs").is_dir() and any(args.out.glob("claims*.json")):
        return _error(
            f"--out {args.out}: this is the folder of one experiment "
            f"({args.out.name}), not an output folder that holds experiments; "
            f"give the folder above it: --out {args.out.parent}"
        )
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission: before any run
        return _error(f"--out {args.out}: {err.strerror or err}; name a folder")
    for name in names:  # and each experiment's: `all` failed at its turn
        runs = args.out / name / "runs"
        try:
            runs.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return _error(
                f"--out {args.out}: {runs}: {err.strerror or err}; move what "
                "is in the way or name another folder"
            )
    try:
        return _reproduce(args, names, dataset, device, workers)
    except KeyboardInterrupt:
        # run_sweep has stored every finished run and stopped the others: a
        # traceback through the pool's waiter said nothing of either
        print(
            f"\ngeocomplexity: interrupted; the finished runs are stored in "
            f"{args.out}: the same command resumes from them",
            file=sys.stderr,
        )
        return 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _reproduce(
    args: argparse.Namespace, names: list[str], dataset: str, device: str, workers: int
) -> int:
    """Run ``names`` into ``args.out`` (checked by :func:`main`): the exit status."""
    from geocomplexity.experiments import EXPERIMENTS, reproduce_one
    from geocomplexity.experiments.report import (
        claims_table,
        collect_claims,
        write_report,
    )
    from geocomplexity.experiments.runner import ClusterUnreachable, DataMismatch

    start = time.perf_counter()
    failed: list[str] = []
    for name in names:
        try:
            outcome = reproduce_one(
                EXPERIMENTS[name],
                args.out,
                preset=args.preset,
                dataset=dataset,
                seeds=args.seeds,
                workers=workers,
                device=device,
                data_dir=args.data_dir,
                executor=args.executor,
                ray_address=args.ray_address,
            )
        except ClusterUnreachable as err:  # a traceback, before
            return _error(str(err))
        except DataMismatch as err:  # stored runs made on another --data-dir
            # a Ray node's (its own copy of the folder) arrives as a
            # RayTaskError that is also a DataMismatch, whose str is the
            # node's traceback in terminal colours: its cause is the message
            cause = getattr(err, "cause", None)
            message = cause if isinstance(cause, DataMismatch) else err
            return _error(f"--data-dir {args.data_dir}: {message}")
        held = sum(c.passed for c in outcome.claims)
        failed += [f"{name}: {c.claim}" for c in outcome.claims if not c.passed]
        print(
            f"{name}: {held}/{len(outcome.claims)} claims hold "
            f"({time.perf_counter() - start:.0f} s so far)"
        )
        if outcome.data:  # a generated folder's claims are no CIFAR-10's
            print(f"  data: {outcome.data}")
    if args.name == "all":
        # as `report` does: every sweep has finished and its runs are stored,
        # so an unreadable claims file of another experiment in the folder
        # (or a folder turned read-only) ends with its fix, not a traceback
        try:
            path = write_report(args.out)
        except (ValueError, OSError) as err:
            return _error(f"{err} (every run is stored; the report was not written)")
        print()
        print(claims_table(collect_claims(args.out)))
        print(f"\nreport: {path}")
    if args.strict and failed:  # for CI: results kept, the status says it
        print(
            f"--strict: {len(failed)} claim{'s' * (len(failed) > 1)} failed: "
            + "; ".join(failed),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
