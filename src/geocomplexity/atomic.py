"""Atomic file writes.

A reader, or a resumed sweep, sees the old file or the new one, never half of
one, even if the writing process is killed mid-write.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_text", "write_with"]


def write_with(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Fill ``path`` through ``write(file)`` on a hidden temporary, then rename.

    The temporary sits beside ``path`` (a rename never crosses file systems),
    has a unique name, so parallel writers never share one, and does not end in
    the target's suffix, so globs skip it. It is flushed to disk before the
    rename and removed if ``write`` fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_with`)."""
    write_with(path, lambda f: f.write(text.encode()))
