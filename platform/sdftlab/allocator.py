"""The C library's allocator for CPU training: reuse freed memory instead of returning it.

    SDFTLAB_CPU_ALLOC=heap      # the default
    SDFTLAB_CPU_ALLOC=system    # the C library's own settings

Imports nothing heavy, so the command line can apply it before anything else runs.
"""

from __future__ import annotations

import os

from sdftlab.errors import ConfigError

CPU_ALLOC_ENV = "SDFTLAB_CPU_ALLOC"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # mallopt parameters (glibc malloc.h)
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Let glibc reuse freed tensor memory instead of handing it back to the OS (CPU training).

    glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages
    from `mmap` and unmaps them on `free`, and gives freed memory at the top of a heap back to
    the OS past its trim threshold. PyTorch's CPU allocator has no cache of its own,
    so each training step page-faults much of its activations in anew: 20–30 thousand faults
    a step on the tiny world's SFT batches. With `mmap` off for malloc and no trimming, a step
    reuses the previous step's memory: the same arithmetic, faster steps
    (`benchmarks/experiments/cpu_alloc.py`; figures in docs/BENCHMARKS.md). The cost is that a
    process keeps its peak heap until it exits, which suits the short-lived workers and
    commands here; where memory is the limit, `SDFTLAB_CPU_ALLOC=system` returns freed memory.

    Applied once per process; a no-op off glibc, or with `SDFTLAB_CPU_ALLOC=system` (the
    C library's defaults). Returns whether the tuning is in effect.
    """
    global _allocator_tuned
    choice = os.environ.get(CPU_ALLOC_ENV, "heap")
    if choice not in ("heap", "system"):
        raise ConfigError(
            f"{CPU_ALLOC_ENV}={choice!r} is not a choice; use heap (the default: reuse freed "
            "memory) or system (the C library's defaults)"
        )
    if _allocator_tuned or choice == "system":
        return _allocator_tuned
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    _allocator_tuned = all(
        libc.mallopt(param, value) == 1
        for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    )
    return _allocator_tuned
