"""Resident memory of a process as the benchmarks report it (MiB, from ``/proc/<pid>/status`` on Linux).

The peak is made to cover only the measured work by resetting the kernel's high-water mark after the
warm-up (:func:`reset_peak`); where that is not allowed, callers compare against the earlier peak.
"""

from __future__ import annotations

import resource
import sys


def _status_mb(field: str, pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's peak-RSS mark (Linux >= 4.0) so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory since start or since :func:`reset_peak`."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mb(pid: int | None = None) -> float:
    """Resident memory now of this process, or of process ``pid`` (which must exist)."""
    if pid is not None:
        value = _status_mb("VmRSS", pid)
        if value is None:
            raise OSError(f"no resident-memory figure for process {pid}")
        return value
    cur = _status_mb("VmRSS")
    return cur if cur is not None else peak_rss_mb()
