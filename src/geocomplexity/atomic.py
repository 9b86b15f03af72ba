"""Atomic file writes.

A reader, or a resumed sweep, sees the old file or the new one, never half of
one, even if the writing process is killed mid-write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: temporaries are written unlocked, never removed
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "claimed",
    "remove_released_claims",
    "remove_stale_temporaries",
    "write_text",
    "write_with",
]

#: A temporary younger than this is left alone even when unlocked: its writer
#: may have made it and not yet locked it.
STALE_AFTER_S = 60.0


def _create_temporary(path: Path) -> tuple[int, str]:
    """Create and open the hidden ``.NAME.XXXXXXXX.tmp`` beside ``path``.

    Created as ``open(path, "w")`` creates a file: mode 0666 less the umask
    in force now (or the folder's default ACL), applied by the kernel. A
    mkstemp temporary is 0600, and a rename keeps that, which hid results from
    the group; and a mode computed from the umask read once, at import, ignored
    a umask set afterwards (077 for private results wrote them 0644).

    Returns:
        The open descriptor (read-write) and the temporary's path.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        # 8 characters, as mkstemp's (remove_stale_temporaries globs them),
        # from the OS's randomness: the global RNGs stay untouched
        tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp"))
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


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
        mode: int | None = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = None  # a new file: the temporary's mode is already right
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # until it is closed
            if mode is not None:
                os.chmod(tmp, mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # renamed while still locked
                os.replace(tmp, path)
        if fcntl is None:  # Windows renames no open file
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_with`)."""
    write_with(path, lambda f: f.write(text.encode()))


def remove_stale_temporaries(folder: Path, target: str = "*") -> list[Path]:
    """Delete the temporaries that killed writers of ``target`` left in ``folder``.

    A writer killed mid-write (``kill -9``, out of memory, power) leaves its
    hidden ``.NAME.XXXX.tmp`` behind: never read as a result, but never removed
    either, so each kill during a checkpoint's write left one more copy of a
    network on disk. A temporary is removed only when no process holds its
    lock (so never one a live process, another sweep into the same folder say,
    is writing) and it is older than :data:`STALE_AFTER_S`. Without ``fcntl``
    (Windows) nothing is removed.

    Args:
        folder: where to look.
        target: a glob of the names written there (``"report.html"``): only
            the temporaries :func:`write_with` makes for them are candidates,
            so a folder shared with other programs keeps their files.

    Returns:
        The paths removed.
    """
    if fcntl is None or not folder.is_dir():
        return []
    now = time.time()
    # write_with's names (and mkstemp's, of versions before): the prefix, 8
    # random characters, the suffix
    return [
        path
        for path in folder.glob(f".{target}.{'?' * 8}.tmp")
        if _removed_unheld(
            path,
            lambda mine: (
                stat.S_ISREG(mine.st_mode) and now - mine.st_mtime > STALE_AFTER_S
            ),
        )
    ]


def _removed_unheld(path: Path, stale: Callable[[os.stat_result], bool]) -> bool:
    """Remove ``path`` if no process holds its lock and ``stale(its stat)``.

    Returns:
        Whether it was removed.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # renamed into place or removed meanwhile
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        mine = os.fstat(fd)
        # a rename or a new file may have come between the open and the
        # lock: remove the name only while it still names the file locked here
        if stale(mine) and os.stat(path).st_ino == mine.st_ino:
            path.unlink()
            return True
    except OSError:  # locked by a live process (BlockingIOError), or gone
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return False


@contextlib.contextmanager
def claimed(path: Path, *, wait: bool) -> Iterator[bool]:
    """Hold the exclusive claim on producing ``path`` (an advisory ``flock``).

    Processes that share a folder (two sweeps into one ``--out``, the same
    command on several machines over a shared disk) compute each run once:
    the one holding the claim computes it, and the others skip it or wait.
    The lock lives on the hidden ``.NAME.lock`` beside ``path``. A writer that
    succeeds removes it only after ``path`` is in place, so whoever takes the
    claim after that finds ``path`` and need not compute; one that fails, or
    is killed (the kernel drops its lock), leaves it for the next to take.
    Without ``fcntl`` (Windows) every claim is granted at once.

    Args:
        path: the file the holder will write.
        wait: block until the claim is free; otherwise yield ``False`` at once
            when another process holds it.

    Yields:
        Whether this process holds the claim.
    """
    if fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
    except PermissionError as err:
        # another user's lock file (0644 under umask 022) in a folder both
        # write to: flock needs no write access to it
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            raise err from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
        # while still locked, and only the lock file this process holds (a
        # waiter may hold a newer one): a waiter that gets it finds path
        with contextlib.suppress(OSError):
            if path.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                lock.unlink()
    finally:
        os.close(fd)


def remove_released_claims(folder: Path) -> list[Path]:
    """Delete the lock files of :func:`claimed` that nobody needs any more.

    A holder removes its lock file once its file is in place, unless it is
    killed in between; one whose work failed leaves it for the next. A lock
    file is removed here only when no process holds it and the file it guards
    exists, so whoever opens it afterwards finds that file and computes
    nothing. Without ``fcntl`` (Windows) nothing is removed.

    Returns:
        The paths removed.
    """
    if fcntl is None or not folder.is_dir():
        return []
    return [
        lock
        for lock in folder.glob(".*.lock")
        if lock.with_name(lock.name[1 : -len(".lock")]).exists()
        and _removed_unheld(lock, lambda _: True)
    ]
