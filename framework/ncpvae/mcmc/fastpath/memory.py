"""Allocator tuning for compiled sampler steps: an explicit, process-wide call that the user
makes (nothing in ncpvae calls it)."""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["retain_freed_memory"]

# glibc's malloc options (mallopt(3)) and the environment variables that set them at start-up
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
               "MALLOC_ARENA_MAX")
_heap_retained: bool | None = None


def retain_freed_memory(trim_threshold: int = 256 << 20, mmap_threshold: int = 32 << 20
                        ) -> bool:
    """Have glibc's ``malloc`` keep freed memory in the process instead of returning it to the
    operating system at once. **Process-wide and irreversible**: it changes how the C
    library's allocator behaves for everything in this Python process, for the rest of its
    life, so only an application (not a library) should call it, once, at start-up. ncpvae
    never calls it; :class:`~ncpvae.mcmc.fastpath.CompiledEnergy` runs without it.

    What it buys: a compiled sampler step allocates and frees its intermediates (a few MB at
    1,024 chains of the benchmark MLP) on every call. With glibc's default, adaptive
    thresholds, the freed memory at the top of the heap is often trimmed and the next step
    page-faults it back: measured ~110-150 minor page faults per step, and the compiled MALA
    step 3-13 % slower than the eager step around the same compiled energy at 1,024 chains of
    the benchmark MLP. With these settings: no such page faults, and the compiled step 5-9 %
    faster than that eager step (``benchmarks/bench_blackjax.py``, ``--retain-freed-memory``).

    It sets ``M_TRIM_THRESHOLD`` (keep up to ``trim_threshold`` bytes of free memory at the
    heap's top) and ``M_MMAP_THRESHOLD`` (serve blocks below ``mmap_threshold`` bytes from the
    heap), once: the same as starting Python with ``MALLOC_TRIM_THRESHOLD_`` and
    ``MALLOC_MMAP_THRESHOLD_`` set (the way to get it without code). The cost is memory: up to
    ``trim_threshold`` freed bytes stay with the process.

    Does nothing, and returns False, where the C library is not glibc or where the user set any
    ``MALLOC_*_`` variable of glibc's malloc (their choice wins); True once set.
    """
    global _heap_retained
    if _heap_retained is None:
        _heap_retained = False
        if not any(name in os.environ for name in _MALLOC_ENV) and \
                platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
                _heap_retained = bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)
                                      and mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
            except (OSError, AttributeError):  # no mallopt in this process's C library
                pass
    return _heap_retained
