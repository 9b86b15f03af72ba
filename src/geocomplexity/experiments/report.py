"""``geocomplexity report DIR``: one self-contained HTML page and a terminal table.

Reads only what the experiments wrote (claims, figures, run records); it never
trains or measures.
"""

from __future__ import annotations

import base64
import html
import json
import platform
from dataclasses import replace
from pathlib import Path

import torch

from geocomplexity.atomic import remove_stale_temporaries, write_text
from geocomplexity.experiments.claims import Claim, load_claims
from geocomplexity.experiments.runner import load_runs

__all__ = ["claims_table", "collect_claims", "write_report"]


def collect_claims(out: Path) -> list[tuple[str, Claim]]:
    """Every ``(experiment, claim)`` under ``out``, data sets included.

    Returns:
        The claims in experiment order.

    Raises:
        ValueError: a claims file that cannot be read (cut short by an
            interrupted run, say), named with how to rewrite it.
    """
    found = []
    for path in sorted(out.glob("*/claims*.json")):
        try:
            claims = load_claims(path)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path} cannot be read ({type(err).__name__}: {err}); rerun "
                f"`geocomplexity reproduce {path.parent.name}` with --out "
                f"{out} (finished runs are kept) to rewrite it, or delete it"
            ) from None
        name = path.parent.name
        if _reads_a_folder(name):  # a claims file from before ``data``
            claims = [c if c.data else replace(c, data="not recorded") for c in claims]
        found.extend((name, c) for c in claims)
    return found


def _reads_a_folder(name: str) -> bool:
    """Whether experiment ``name`` reads a data folder (``folder_data``)."""
    from geocomplexity.experiments import EXPERIMENTS

    experiment = EXPERIMENTS.get(name)
    return experiment is not None and experiment.folder_data is not None


def _doubtful(data: str) -> bool:
    """Whether a claim's ``data`` says it is not the full data, or unknown."""
    return any(
        flag in data for flag in ("not the full", "not recorded", "not known to")
    )


def _data_lines(claims: list[tuple[str, Claim]]) -> list[tuple[str, str]]:
    """Each experiment's data folder in words, once, in the claims' order."""
    return list(dict.fromkeys((name, c.data) for name, c in claims if c.data))


def claims_table(claims: list[tuple[str, Claim]]) -> str:
    """A plain-text table of the claims for the terminal.

    Its columns are report.html's: n is how many numbers each statistic rests
    on (a claim on 2 runs reads differently from one on 30). Cells longer
    than 60 characters are cut, ending in "…"; report.html has them whole.
    Below it, each experiment that reads a data folder has a line with that
    data (:attr:`Claim.data`): the data column's "cifar10" alone would not
    tell a generated folder from CIFAR-10.

    Returns:
        The table.
    """
    head = (
        "experiment",
        "data",
        "preset",
        "claim",
        "statistic",
        "value",
        "threshold",
        "n",
        "verdict",
    )
    rows = [head] + [
        (
            name,
            c.dataset,
            c.preset,
            c.claim,
            c.statistic,
            f"{c.value:.4g}",
            c.threshold,
            str(c.n),
            "PASS" if c.passed else "FAIL",
        )
        for name, c in claims
    ]
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(len(head))]

    def fit(cell: str, w: int) -> str:
        # a cut cell says so: a failed claim's reason is often at its end
        return cell.ljust(w) if len(cell) <= w else cell[: w - 1] + "…"

    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(fit(cell, w) for cell, w in zip(row, widths, strict=True))
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.extend(f"{name} data: {data}" for name, data in _data_lines(claims))
    return "\n".join(lines)


def _configs(directory: Path) -> tuple[dict[str, list], dict[str, set[str]]]:
    """Each config key with the values it takes, and the versions that ran.

    Only the runs behind the claims shown (listed in ``sweep*.json``) count,
    when those files exist; unreadable run files are skipped, as the runner
    skips them.
    """
    runs = load_runs(directory)
    keys: set[str] = set()
    for path in directory.glob("sweep*.json"):
        try:
            keys.update(json.loads(path.read_text())["keys"])
        except (OSError, ValueError, KeyError, TypeError):
            keys = set(runs)  # an unreadable list: show every run
            break
    if not keys & set(runs):  # no list, or its runs were deleted: show all
        keys = set(runs)
    values: dict[str, set] = {}
    versions: dict[str, set[str]] = {}
    for key in sorted(keys):
        record = runs.get(key)
        if record is None:
            continue
        for k, v in record.get("versions", {}).items():
            versions.setdefault(k, set()).add(str(v))
        for k, v in record["config"].items():
            values.setdefault(k, set()).add(json.dumps(v))
    ordered = {k: sorted(v, key=_numbers_first) for k, v in sorted(values.items())}
    return ordered, versions


def _numbers_first(text: str) -> tuple[int, float, str]:
    """Sort key for a JSON config value: numbers by value, then the rest as text.

    Sorted as text, widths 2, 8, 16, 32, 64 read "16, 2, 32, 64, 8".
    """
    value = json.loads(text)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return 0, float(value), ""
    return 1, 0.0, text


def write_report(out: Path) -> Path:
    """Write ``out/report.html`` with every claim, figure and config.

    Returns:
        The report's path.

    Raises:
        FileNotFoundError: ``out`` holds no experiment results.
        OSError: ``report.html`` cannot be written there (a read-only folder).
    """
    claims = collect_claims(out)
    if not claims and any(out.glob("claims*.json")):
        # one experiment's folder: running `reproduce` with --out there, as
        # the message below advises, would compute every run again
        raise FileNotFoundError(
            f"{out} is the folder of one experiment ({out.name}), not an "
            "output folder that holds experiments; give the folder above it: "
            f"geocomplexity report {out.parent}"
        )
    if not claims:
        raise FileNotFoundError(
            f"{out} holds no experiment results (no */claims.json); run "
            "`geocomplexity reproduce ...` with --out pointing there first"
        )
    esc = html.escape
    passed = sum(c.passed for _, c in claims)
    parts = [
        "<!doctype html><meta charset='utf-8'><title>geocomplexity report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}"
        ".pass{background:#dfd}.fail{background:#fdd}img{max-width:100%}</style>",
        "<h1>Geometric complexity: reproduced claims</h1>",
        f"<p>{passed} of {len(claims)} claims hold.</p>",
        "<table><tr><th>experiment</th><th>data</th><th>preset</th><th>claim</th>"
        "<th>statistic</th>"
        "<th>value</th><th>threshold</th><th>n</th><th>verdict</th></tr>",
    ]
    for name, c in claims:
        cls, word = ("pass", "PASS") if c.passed else ("fail", "FAIL")
        note = f"<br><small>data: {esc(c.data)}</small>" if c.data else ""
        parts.append(
            f"<tr class='{cls}'><td>{esc(name)}</td><td>{esc(c.dataset)}{note}</td>"
            f"<td>{esc(c.preset)}</td><td>{esc(c.claim)}</td><td>{esc(c.statistic)}</td>"
            f"<td>{c.value:.4g}</td><td>{esc(c.threshold)}</td><td>{c.n}</td>"
            f"<td>{word}</td></tr>"
        )
    parts.append("</table>")
    versions: dict[str, set[str]] = {}
    for directory in sorted({out / name for name, _ in claims}):
        parts.append(f"<h2>{esc(directory.name)}</h2>")
        # what the claims rest on; a generated folder's, or unknown, stands out
        for name, data in _data_lines(claims):
            if name == directory.name:
                cls = " class='fail'" if _doubtful(data) else ""
                parts.append(f"<p{cls}>data: {esc(data)}</p>")
        # the claims again beside their figures: verdict, statistic, threshold
        parts.append("<ul>")
        for name, c in claims:
            if name == directory.name:
                cls, word = ("pass", "PASS") if c.passed else ("fail", "FAIL")
                parts.append(
                    f"<li class='{cls}'><b>{word}</b> {esc(c.claim)} "
                    f"[{esc(c.dataset)}, {esc(c.preset)}]: {esc(c.statistic)} = "
                    f"{c.value:.4g}, needs {esc(c.threshold)} (n = {c.n})</li>"
                )
        parts.append("</ul>")
        for png in sorted(directory.glob("*.png")):
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(
                f"<figure><img alt='{esc(png.name)}' "
                f"src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(png.name)}</figcaption></figure>"
            )
        configs, seen = _configs(directory)
        for k, v in seen.items():
            versions.setdefault(k, set()).update(v)
        parts.append("<details><summary>configs</summary><table>")
        parts.extend(
            f"<tr><td>{esc(k)}</td><td>{esc(', '.join(v))}</td></tr>"
            for k, v in configs.items()
        )
        parts.append("</table></details>")
    parts.append("<h2>Environment</h2><table>")
    env = {
        **{k: ", ".join(sorted(v)) for k, v in sorted(versions.items())},
        "report torch": torch.__version__,
        "report machine": platform.platform(),
    }
    parts.extend(
        f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in env.items()
    )
    parts.append("</table>")
    path = out / "report.html"
    # what a report killed mid-write left; --out may be a folder shared with
    # other programs, so only report.html's own temporaries
    try:
        remove_stale_temporaries(out, "report.html")
        write_text(path, "\n".join(parts))
    except OSError as err:  # a read-only folder: say which file, not errno
        raise type(err)(f"cannot write {path}: {err.strerror or err}") from err
    return path
