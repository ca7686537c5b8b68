"""The server process's native memory: glibc's malloc settings, and freed heap pages given back after jobs.

Python objects do not grow under load (a tracemalloc diff over 600 requests: +0.3 MiB, Gradio's bounded
event records); the server's RSS crept up because glibc kept freed request buffers (image arrays,
tensors) resident. Figures in docs/app.md, Hosting. Nothing here does anything without glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_malloc(arenas: int = 2, mmap_threshold: int = 1 << 20, trim_threshold: int = 4 << 20) -> None:
    """Make glibc's malloc give freed request buffers back to the system.

    Each request allocates and frees image arrays and tensors of a few hundred kB to a few MB. By default
    glibc raises its mmap threshold (up to 32 MiB) after such a buffer is freed, so later ones come from
    the heaps, where fragmentation keeps them resident; and each worker thread may get its own heap.
    Here: at most ``arenas`` heaps (like ``MALLOC_ARENA_MAX``), buffers of ``mmap_threshold`` bytes and
    more mapped on their own (returned on free), free heap tops past ``trim_threshold`` trimmed."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (fixed: no longer raised after frees)
        libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD


class HeapTrimmer:
    """``malloc_trim(0)`` when a job ends, at most every ``every`` seconds: glibc then returns the free pages
    inside its heaps too (the trim threshold above only returns a heap's free top). ctypes releases the
    interpreter during the call, so other requests go on meanwhile."""

    def __init__(self, every: float = 5.0):
        self.every = every
        self._libc = _glibc()
        self._last = -float("inf")
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        """Trim now unless it was done less than ``every`` seconds ago; whether it trimmed."""
        if self._libc is None:
            return False
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.every:
                return False
            self._last = now
        self._libc.malloc_trim(0)
        return True


trim_heap = HeapTrimmer()
"""The server's trimmer, called by :class:`demo.jobs.Jobs` as each job ends."""
