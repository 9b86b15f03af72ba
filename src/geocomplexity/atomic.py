"""Atomic file writes.

A reader, or a resumed sweep, sees the old file or the new one, never half of
one, even if the writing process is killed mid-write.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_text"]


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden temporary file and a rename.

    The temporary name carries the process id, so parallel writers never share
    one, and it does not end in the target's suffix, so globs skip it.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
