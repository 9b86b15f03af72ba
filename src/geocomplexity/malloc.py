r"""Keep freed memory in the process: faster CPU autograd under glibc.

PyTorch has no caching allocator on the CPU; every tensor is a ``malloc``. With
glibc's defaults, a large block (past a threshold of 128 KiB that adapts up to
32 MiB) is mapped fresh from the kernel and, once freed, the top of the heap is
handed back as soon as more than about twice that lies unused. The next
allocation of the same size then touches new pages, and each page costs a
fault. Geometric complexity allocates exactly such blocks on every call: the
``k`` vector-Jacobian products of the exact method hold ``k·B`` rows of every
layer's activations, which are created and freed again within milliseconds. On
this project's 2-core machine the page faults made exact GC of a small MLP
1.4× slower than it is with the memory kept (``benchmarks/``).

:func:`tune_malloc` raises both thresholds with ``mallopt``, so that freed blocks
are reused instead of re-faulted. This is the same advice as PyTorch's CPU
performance guide (which swaps in jemalloc or tcmalloc for it), done without a
new library. It is process-wide: memory the program freed stays mapped (up to
``trim_threshold`` beyond what is in use) instead of going back to the system.
The ``geocomplexity`` command and ``make bench`` call it; a library user opts in::

    import geocomplexity.malloc
    geocomplexity.malloc.tune_malloc()

The same setting from the shell, for any program::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python ...
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD_MAX", "is_glibc", "tune_malloc", "tuned"]

#: glibc's ceiling for ``M_MMAP_THRESHOLD`` (larger values are refused): 32 MiB
#: on 64-bit systems, 512 KiB on 32-bit ones. Blocks up to this size come from
#: the reusable heap.
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024 if ctypes.sizeof(ctypes.c_long) == 8 else 1 << 19

# mallopt parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: tuple[int, int] | None = None


def tuned() -> tuple[int, int] | None:
    """The ``(mmap_threshold, trim_threshold)`` this process last applied, if any.

    Process pools read it to give their spawned workers the same setting.
    """
    return _applied


def is_glibc() -> bool:
    """Whether this process runs on glibc (Linux with the GNU C library)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # musl and others do not know the name
        return False


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30
) -> bool:
    """Make glibc keep and reuse freed blocks instead of returning them.

    Args:
        mmap_threshold: blocks at least this large are mapped on their own (and
            unmapped when freed); at most :data:`MMAP_THRESHOLD_MAX` bytes.
        trim_threshold: free memory at the top of the heap beyond this many
            bytes is returned to the system.

    Returns:
        ``True`` when both settings took effect; ``False`` where there is no
        glibc (macOS, Windows, musl), and nothing was changed.

    Raises:
        ValueError: a threshold that is not a positive integer, or an mmap
            threshold above glibc's ceiling.
    """
    for name, value in (
        ("mmap_threshold", mmap_threshold),
        ("trim_threshold", trim_threshold),
    ):
        # mallopt takes a C int
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 0 < value < 2**31
        ):
            raise ValueError(
                f"{name} must be a positive number of bytes below 2**31, got {value!r}"
            )
    if mmap_threshold > MMAP_THRESHOLD_MAX:
        raise ValueError(
            f"mmap_threshold={mmap_threshold} exceeds glibc's ceiling of "
            f"{MMAP_THRESHOLD_MAX} bytes on this system, which it would refuse"
        )
    if not is_glibc():
        return False
    global _applied
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success and 0 when it refuses a value
    if libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) != 1:
        return False  # refused: nothing changed (the trim setting is not tried)
    if libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) != 1:
        return False
    _applied = (mmap_threshold, trim_threshold)
    return True
