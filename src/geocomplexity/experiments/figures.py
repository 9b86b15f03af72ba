"""Figure plumbing shared by the experiments: a headless pyplot and saving.

matplotlib is an optional dependency, imported here only when a figure is drawn.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from geocomplexity.atomic import write_with

__all__ = ["pyplot", "save"]


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


def save(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Lay out, write (atomically, as a PNG) and close a figure.

    A sweep killed while a figure is written leaves the previous figure, never
    a truncated one that the report would embed.

    Returns:
        ``path``.
    """
    fig.tight_layout()
    try:
        write_with(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)
    return path
