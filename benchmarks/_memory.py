"""Peak resident memory of this process, for the benchmarks' fresh measuring subprocesses.

`resource.getrusage(...).ru_maxrss` is not this process's own peak on Linux: a child started from a
large parent (fork + exec) reports at least the parent's resident size at the fork. VmHWM in
/proc/self/status is the peak of this process's own address space, and writing "5" to
/proc/self/clear_refs resets it to the current resident size, so a measurement can start at a
known point."""
from __future__ import annotations

import resource


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory now (MiB)."""
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak() -> None:
    """Start the peak over at the current resident size (Linux >= 4.0; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started or since `reset_peak` (MiB); where
    /proc is missing, ru_maxrss (which may include a parent's peak, see above)."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
