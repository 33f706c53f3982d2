"""Handing memory that Python freed back to the operating system.

Sub-package bodies of ~1000 bytes are too large for Python's small-object allocator (512 bytes
at most), so each stored package is a chunk of the C library's ``malloc`` heap.  When a flood of
unfinished series is dropped, the chunks are freed but glibc keeps the pages: it shrinks a heap
only from its top (past ``M_TRIM_THRESHOLD``, 128 KiB), and one live allocation above the freed
chunks, such as a dict resized meanwhile, pins all of them.  Measured with
``bench/reassembly_memory.py`` (40 terminals x 8000 packages of 1000 bytes, never completed,
then timed out, under the reassembler's default 256 MiB cap): a process went from 37 MiB to
319 MiB RSS and stayed at 314 MiB once the series were gone.  ``malloc_trim(0)`` gives back
every whole free page of every arena (with ``madvise(MADV_DONTNEED)``, glibc >= 2.8, not only
the top of the heap): the same process went back to 38.5 MiB, the longest call taking 16 ms.

Only glibc has ``malloc_trim``.  Elsewhere (musl, macOS, Windows) :func:`release_free_memory`
does nothing and returns False; :data:`CAN_RELEASE` tells which.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``int malloc_trim(size_t pad)``, or None when the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)  # the process' own symbols: the C library is loaded already
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has no malloc_trim)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()

#: Whether :func:`release_free_memory` can do anything in this process.
CAN_RELEASE = _MALLOC_TRIM is not None


def release_free_memory() -> bool:
    """Ask the C allocator to return its free pages to the operating system.

    True if some memory was returned; False if there was none to return or the C library has
    no way to (not glibc).  It walks the free chunks of every heap arena and holds each
    arena's lock meanwhile (~20 ms after 250 MiB of package bodies were freed), so call it
    after large releases only, a few seconds apart at most.
    """
    if _MALLOC_TRIM is None:
        return False
    released = bool(_MALLOC_TRIM(0))
    logger.debug("malloc_trim: %s", "memory returned" if released else "nothing to return")
    return released


def resident_bytes() -> int | None:
    """This process' resident set size from ``/proc/self/statm``; None where there is none."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")  # statm exists only where sysconf does
