"""Keep freed tensor memory in the process for reuse (glibc only; elsewhere a no-op).

A merge allocates and frees buffers of the same few sizes thousands of times. glibc serves every large
request with a fresh ``mmap`` and returns it with ``munmap``, so each new buffer costs a page fault and
a kernel-zeroed page per 4 KiB: measured at over half of a merge's CPU time on 2 cores (see
docs/performance.md). Serving them from the heap and keeping freed memory there makes a buffer's second
use free. The heap grows only when no freed block fits, so the process's peak stays close to what the
merge holds at its peak (fragmentation adds a little; docs/performance.md has the figures).

The setting is process-wide and stays after the merge. A program that embeds mgc and wants glibc's
defaults can set ``MGC_MALLOC=default`` in the environment.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

_done = False


def keep_freed_memory(top_pad: int = 64 << 20) -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse. True when applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MGC_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt's value is an int: 2**31 - 1 bytes is the largest trim threshold it can take.
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) \
        and bool(mallopt(M_TOP_PAD, top_pad))
    return _done
