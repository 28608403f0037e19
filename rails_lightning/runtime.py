"""Process-wide settings a training run makes before it builds anything, shared by the CLI and the
benchmarks that time what ``fit`` does."""

from __future__ import annotations

import os
import sys


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory in the process instead of returning it at once.

    A training step on the CPU allocates and frees large tensors (MoL's (positions x negatives x
    components) gates); glibc serves each from a fresh mmap that the kernel must zero page by page, so
    much of a MoL step's time went to the kernel. Keeping the memory trades that for a higher resident
    peak. A no-op outside glibc, or when the user set malloc's knobs (``MALLOC_MMAP_MAX_``).

    ``fit`` calls it before building anything; benchmarks that time training steps call it too, so
    that they measure the allocator ``fit`` runs with.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name or os.environ.get("MALLOC_MMAP_MAX_") is not None:
        return  # not glibc, or the user set malloc's knobs already
    try:
        libc = ctypes.CDLL(name)
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap, not fresh mmaps
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # return the heap's free top only beyond 2 GiB (an int)
    except (OSError, AttributeError):
        pass
