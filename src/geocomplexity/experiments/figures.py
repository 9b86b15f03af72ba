"""Figure plumbing shared by the experiments: a headless pyplot and saving.

matplotlib is an optional dependency, imported here only when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

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
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Lay out, write and close a figure.

    Returns:
        ``path``.
    """
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
