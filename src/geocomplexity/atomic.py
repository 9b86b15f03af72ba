"""Atomic file writes.

A reader, or a resumed sweep, sees the old file or the new one, never half of
one, even if the writing process is killed mid-write.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_text", "write_with"]


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


#: What ``open(path, "w")`` would give a new file: mkstemp's temporaries are
#: 0600, and a rename keeps that, which would hide results from the group.
_NEW_FILE_MODE = 0o666 & ~_umask()


def write_with(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Fill ``path`` through ``write(file)`` on a hidden temporary, then rename.

    The temporary sits beside ``path`` (a rename never crosses file systems),
    has a unique name, so parallel writers never share one, and does not end in
    the target's suffix, so globs skip it. It is flushed to disk before the
    rename and removed if ``write`` fails. The file gets the permissions a plain
    ``open`` would give it (those of the file it replaces, else the umask's).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = _NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
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
