"""glibc malloc settings for the long CPU jobs (``train``, ``evaluate``, ``reproduce``, ``bench_e2e``).

PyTorch's CPU allocator takes tensor memory from glibc's ``malloc``.  By default glibc serves a block
of 32 MB or more (less, until its dynamic threshold has grown) with a fresh ``mmap`` and gives it back on
``free``, and trims the top of its heap once more than twice that threshold is free.  A training step
or a 513x513 forward frees and re-allocates tens to hundreds of megabytes of activations, so the
kernel maps, zero-fills and page-faults that memory again at every step: a 64 MB tensor costs 16k page
faults each time.  :func:`keep_freed_memory` raises the mmap and trim thresholds (``mallopt``) so that
freed memory mostly stays in the process and the next step reuses it: on the 2-core CI machine 13x fewer
page faults per CPU training step and 23x per 513x513 inference, 4-12 % less time (benchmarks/RESULTS.md).
The price is resident memory: up to ``threshold`` bytes of freed memory are kept instead of returned to
the system.

What jemalloc or tcmalloc (``LD_PRELOAD``) would also do, without a preload: the entry points call it
once, a library import never does.  ``ATTNSCALE_MALLOC_TUNING=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Serve allocations below ``threshold`` bytes from the heap, keep up to ``threshold`` bytes of freed
    memory in it, and grow it ``top_pad`` bytes at a time.  Returns True when glibc accepted all three,
    False where it does not apply (not glibc, ``ATTNSCALE_MALLOC_TUNING=0``) or refused one."""
    if os.environ.get("ATTNSCALE_MALLOC_TUNING", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, threshold),
                                              (M_TOP_PAD, top_pad)))
