"""Host memory: keep what a step frees for the next step instead of handing it back to the OS.

A training step allocates and frees the same activations every step: tens of megabytes for
the demo, gigabytes at the paper's size. glibc's malloc serves large blocks with mmap.
That means over 128 KiB at first, and up to 32 MiB as its threshold adapts. It also hands
freed memory at the top of its heap back to the kernel (trimming). So each step faults the
same memory in again, page by page, and the kernel zeroes every page first. On this
project's 2-core EPYC VM, where a fault costs ~3 us, the demo's U-Net (width 8, batch norm,
8 x 128 x 128) took 8,437 minor faults a step (33 MB). Without them the step went from
111 to 86 ms, and whole-slice validation of the demo's 128 slices from 8.6 to 5.7 s.
(`tests/test_host_memory.py` checks the faults; the times are from one session.)

The policy ("retain", the default) sets two malloc options at import:

- no mmap for large blocks (``M_MMAP_MAX`` = 0): every block comes from the heap, which
  malloc reuses;
- trimming only above 2 GiB of free memory at the heap's top (``M_TRIM_THRESHOLD``).

The cost: the process keeps its peak memory until it ends, as a caching allocator does.
PyTorch's GPU allocator does the same, and jemalloc and tcmalloc keep most of it.

``NODULEKIT_MALLOC=system`` leaves glibc's defaults. So do any ``MALLOC_*_`` settings of the
user's own, and a C library without glibc's ``mallopt`` (not Linux, or musl). `policy()`
says which one applies; benchmarks record it.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "NODULEKIT_MALLOC"  # "retain" (default) or "system"
POLICIES = ("retain", "system")
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB
# glibc's environment tunables: a user who set one chose their own policy
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                 "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_applied = "not set up yet"


def policy() -> str:
    """The policy in force, in words (for benchmark provenance)."""
    return _applied


def retain_freed_memory() -> str:
    """Apply the "retain" policy unless told otherwise (module doc); returns `policy()`."""
    global _applied
    asked = os.environ.get(ENV, "retain").strip().lower() or "retain"
    if asked not in POLICIES:
        _applied = f"system ({ENV}={asked!r} is not one of {', '.join(POLICIES)})"
    elif asked == "system":
        _applied = f"system ({ENV}=system)"
    elif any(k in os.environ for k in USER_SETTINGS):
        _applied = "system (the user's own MALLOC_* / GLIBC_TUNABLES settings)"
    elif not sys.platform.startswith("linux"):
        _applied = "system (not Linux)"
    else:
        _applied = _mallopt()
    return _applied


def _mallopt() -> str:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "system (no mallopt in this C library)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; musl has a stub that returns 0
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "system (mallopt refused the settings)"
    return "retain (glibc: no mmap for large blocks, trim above 2 GiB)"
