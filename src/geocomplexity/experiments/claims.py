"""Claims: a statistic computed from runs, a threshold, and a verdict.

Verdicts are computed, never written by hand: a claim that fails is reported as
failed, with its statistic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from geocomplexity.atomic import write_text

__all__ = ["Claim", "load_claims", "spearman", "write_claims"]


@dataclass(frozen=True)
class Claim:
    """One checkable statement of the paper.

    Attributes:
        claim: the statement, in words.
        statistic: what was computed (``"Spearman(depth, GC)"``).
        value: its value.
        threshold: the comparison that decides, e.g. ``"<= -0.9"``.
        passed: whether ``value`` satisfies ``threshold``.
        n: how many numbers the statistic rests on.
        dataset: the data set it was computed on.
        preset: the preset of the sweep behind it (``"quick"``, ...).
        data: for an experiment that reads a data folder, the data its runs
            were made on, in words: ``"CIFAR-10 from /path (50000+10000
            images, sha256 ...)"``, flagged ``"; not the full CIFAR-10: N+M
            images"`` for a smaller folder, ``"not recorded"`` for runs
            stored before fingerprints; ``""`` for the others (their data is
            ``dataset``, fixed by the config).
    """

    claim: str
    statistic: str
    value: float
    threshold: str
    passed: bool
    n: int
    dataset: str = ""
    preset: str = ""
    data: str = ""

    @classmethod
    def check(
        cls,
        claim: str,
        statistic: str,
        value: float,
        op: str,
        limit: float,
        n: int,
        dataset: str = "",
    ) -> Claim:
        """Build a claim and decide it: ``value op limit``, NaN never passes.

        Returns:
            The claim with its verdict.

        Raises:
            ValueError: unknown comparison.
        """
        ops = {
            "<=": value <= limit,
            ">=": value >= limit,
            "<": value < limit,
            ">": value > limit,
        }
        if op not in ops:
            raise ValueError(f"unknown comparison {op!r}")
        passed = bool(ops[op]) and not math.isnan(value)
        return cls(
            claim, statistic, float(value), f"{op} {limit:g}", passed, n, dataset
        )


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (1-based)."""
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(1, len(v) + 1, dtype=v.dtype)
    for value in torch.unique(v):
        tied = v == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties averaged).

    NaN if either sequence is constant or holds a NaN or an infinity: a
    diverged run has no rank, and ranking it last could count for a claim (a
    run whose weights blew up can measure GC = inf, its test loss still
    finite). NaN too where either
    holds fewer than three distinct values: two points are ranked ±1 whatever
    they are, so a trend claim left with two settings (the others' runs
    dropped, say) would pass on no evidence.

    Returns:
        The correlation in [-1, 1], or NaN.
    """
    a = torch.as_tensor(list(x), dtype=torch.float64)
    b = torch.as_tensor(list(y), dtype=torch.float64)
    if len(a) != len(b):
        raise ValueError("x and y differ in length")
    if not (a.isfinite().all() and b.isfinite().all()):
        return math.nan
    if len(a.unique()) < 3 or len(b.unique()) < 3:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt()
    return math.nan if denom == 0 else (ra @ rb / denom).item()


def write_claims(path: Path, claims: Sequence[Claim]) -> None:
    """Write ``claims.json`` (a list of dicts) atomically.

    ``data`` is left out where empty: the claims of an experiment without a
    data folder are written as before it existed.
    """
    rows = [asdict(c) for c in claims]
    for row in rows:
        if not row["data"]:
            del row["data"]
    write_text(path, json.dumps(rows, indent=1))


def load_claims(path: Path) -> list[Claim]:
    """Read what :func:`write_claims` wrote.

    Returns:
        The claims.
    """
    return [Claim(**d) for d in json.loads(path.read_text())]
