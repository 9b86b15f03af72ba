"""Figure plumbing shared by the experiments: a headless pyplot and saving.

matplotlib is an optional dependency, imported here only when a figure is drawn.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from geocomplexity.atomic import write_with

__all__ = [
    "closed_on_error",
    "data_scale",
    "log_colorbar",
    "log_xticks",
    "pyplot",
    "save",
]


def pyplot() -> Any:
    """``matplotlib.pyplot``, on the non-interactive Agg backend if it is new.

    Where pyplot is already imported, its backend (a notebook's, a script's)
    is the caller's choice and is left alone: the figures are written with
    ``savefig``, which any backend can do, and closed.

    Returns:
        The pyplot module.

    Raises:
        ImportError: matplotlib is missing.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "figures need matplotlib: pip install 'geocomplexity[plot]'"
        ) from err
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_xticks(ax: Any, values: Sequence[float], spacing: float = 1.0) -> None:
    """A log x-axis labelled at swept values, as plain numbers.

    On an axis spanning about one decade (widths 2-128, depths 1-32),
    matplotlib also labels the minor ticks (``2×10⁰``, ``3×10⁰``, ...), and on
    a panel a few inches wide those labels run into each other. Here the ticks
    are the swept values themselves, thinned so that each is at least
    ``spacing`` times the last labelled one (``spacing=1.9`` labels 2, 4, 8,
    16, ... of widths 2, 4, 6, 8, 10, 12, 16, ...), and minor ticks are off.

    Args:
        ax: a matplotlib Axes.
        values: the swept values (positive), in any order.
        spacing: the least ratio between neighbouring labelled values.
    """
    ticks = _thinned(values, spacing)
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.minorticks_off()


def data_scale(values: Sequence[float]) -> str:
    """``"log"`` for positive values spanning a decade or more, else ``"linear"``.

    A log axis over less than a decade gets matplotlib's minor-tick labels
    (``2.27×10⁰``, ``9.4×10⁻²``, ...), which crowd a panel and are hard to
    read; on such a range a linear axis shows the same shape plainly.

    Args:
        values: the values the axis will show (non-finite ones are ignored).
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return "linear"
    return "log" if max(finite) / min(finite) >= 10 else "linear"


def log_colorbar(
    fig: Any, points: Any, values: Sequence[float], label: str, spacing: float = 1.0
) -> Any:
    """Colour ``points`` on a log scale and add a colour bar labelled in values.

    A colour bar in ``log2(width)`` (1, 2, ..., 6) makes the reader do the
    arithmetic; here the scale is logarithmic and its ticks are the values
    themselves, thinned as in :func:`log_xticks`.

    Args:
        fig: the Figure that gets the colour bar.
        points: what ``ax.scatter(..., c=values)`` returned.
        values: the values the points are coloured by (positive).
        label: the colour bar's label.
        spacing: the least ratio between neighbouring labelled values.

    Returns:
        The Colorbar.
    """
    from matplotlib.colors import LogNorm

    lo, hi = min(values), max(values)
    # one value: LogNorm(v, v) has no range to draw a colour bar over
    points.set_norm(LogNorm(lo / 2, hi * 2) if lo == hi else LogNorm(lo, hi))
    ticks = _thinned(values, spacing)
    bar = fig.colorbar(points, label=label)
    bar.set_ticks(ticks, labels=[f"{v:g}" for v in ticks])
    bar.ax.minorticks_off()
    return bar


def _thinned(values: Sequence[float], spacing: float) -> list[float]:
    """The distinct values, ascending, each >= ``spacing`` times the last kept."""
    ticks: list[float] = []
    for v in sorted(set(values)):
        if not ticks or v >= spacing * ticks[-1]:
            ticks.append(v)
    return ticks


def save(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Lay out, write (atomically, as a PNG) and close a figure.

    A sweep killed while a figure is written leaves the previous figure, never
    a truncated one that the report would embed.

    Returns:
        ``path``.
    """
    try:
        fig.tight_layout()
        write_with(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)
    return path


def _open_figures() -> set[int]:
    """The numbers of pyplot's open figures (none where pyplot is not imported)."""
    plt = sys.modules.get("matplotlib.pyplot")
    return set() if plt is None else set(plt.get_fignums())


def closed_on_error(draw: Callable[..., Any]) -> Callable[..., Any]:
    """``draw``, which closes the figures it opened when it raises.

    A plot that fails between ``plt.subplots`` and :func:`save` (a bad
    record, a matplotlib error) would leave its figure in pyplot's registry,
    one more for each failure in a session. On success the figures are
    :func:`save`'s to close, and left alone here.

    Returns:
        The wrapped function.
    """

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = _open_figures()
        try:
            return draw(*args, **kwargs)
        except BaseException:
            plt = sys.modules.get("matplotlib.pyplot")
            if plt is not None:
                for number in _open_figures() - before:
                    plt.close(number)
            raise

    return wrapper
