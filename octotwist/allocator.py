"""
How our processes ask the C allocator for memory.

octotwist moves data in 4 MiB parts: every part received or sent is a few
fresh 4 MiB buffers (the joined frame, the decrypted payload, the blob).
glibc serves an allocation that large with its own C{mmap} and gives it back
with C{munmap} when it is freed, so each part's buffers are new pages that
the kernel must fault in and zero: on our 2-core machines that was most of
what a transfer cost (the tcp transport moved a 200 MB blob at ~500 MiB/s;
with the buffers reused, ~1000-1200 MiB/s, both measured by
benchmarks/transfer.py in one run).  L{tune} keeps such buffers in the heap,
where freed ones are reused, and bounds how much free heap is kept back from
the system (L{TRIM_THRESHOLD}), so memory still goes back once a job's
buffers are gone.

Only glibc has C{mallopt}; elsewhere (musl, macOS) L{tune} does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: Allocations below this come from the heap, not from their own mmap.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap beyond this goes back to the system.
TRIM_THRESHOLD = 64 * 1024 * 1024

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def tune() -> bool:
    """
    Set the allocator up for large, short-lived buffers (once per process).

    @return: whether it could (glibc only).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
