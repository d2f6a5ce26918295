"""Host memory, phase by phase: freed memory goes back to the OS where a run builds, shards, loads or
saves large tensors, and no training step pays for it.

glibc serves an allocation from its heap unless it is at least the mmap threshold. The threshold starts
at 128 KiB and, by default, rises to the size of each large block freed (up to 32 MiB), after which
freed tensors stay in the heap, fragmented and resident. Building a sharded model tensor by tensor,
ZeRO-3's partitioning, and a checkpoint's load or save then hold far more resident memory than they
use. A low threshold fixes that, but for the whole process it turns every large allocation of every
step into an mmap, a page fault per page and an munmap: measured, about a third slower per step.

So the threshold is low only inside `returning_freed_memory()`: the engine build (`registry.build_engine`)
and the checkpoint manager's load and save wrap themselves in it. On leaving the outermost scope the
threshold goes to glibc's own ceiling (32 MiB, with the trim threshold at twice that, the values its
dynamic rule settles on once training runs), and `malloc_trim(0)` hands back what the phase freed.
A user's own `MALLOC_MMAP_THRESHOLD_` wins (nothing is changed), and so does a libc that is not glibc.
Imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
PHASE_MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's starting value; freed blocks at or above it leave at once
STEADY_MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
STEADY_TRIM_THRESHOLD = 2 * STEADY_MMAP_THRESHOLD  # what glibc's dynamic rule pairs with it

_depth = 0
_lock = threading.Lock()


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc's handle, or None where this module must change nothing."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both exist in glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def _set(mmap_threshold: int, trim_threshold: int) -> None:
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


@contextlib.contextmanager
def returning_freed_memory() -> Iterator[None]:
    """Within: allocations of 128 KiB and more are mmaps, so freeing them returns the memory at once.
    After the outermost scope: the steady thresholds, and what the phase freed handed back."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1:
            _set(PHASE_MMAP_THRESHOLD, PHASE_MMAP_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(STEADY_MMAP_THRESHOLD, STEADY_TRIM_THRESHOLD)
                libc = _glibc()
                if libc is not None:
                    libc.malloc_trim(0)
