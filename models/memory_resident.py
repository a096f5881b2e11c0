"""What this process holds in memory now, from /proc/self/status (for the load log).

Standard library only, like ``memory_budget``.
"""

from __future__ import annotations

from pathlib import Path

from llama_mpi.models.memory_budget import KiB, gib, read_stat

PROC_SELF_STATUS = Path("/proc/self/status")  # a module constant so tests can fake it

_STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def resident_bytes() -> dict[str, int]:
    """This process's resident memory from /proc/self/status, in bytes: VmRSS (= RssAnon +
    RssFile + RssShmem), VmHWM (peak RSS). Keys the kernel does not give are left out."""
    status = read_stat(PROC_SELF_STATUS)
    return {k: status[k] * KiB for k in _STATUS_KEYS if k in status}


def describe_resident() -> str:
    """'RSS 10.3 GiB (anon 614 MiB, file 9.7 GiB), peak 10.4 GiB' for the load log."""
    r = resident_bytes()
    if "VmRSS" not in r:
        return "RSS unknown"
    parts = [f"{label} {gib(r[k])}" for label, k in (("anon", "RssAnon"), ("file", "RssFile"),
                                                     ("shmem", "RssShmem")) if r.get(k)]
    text = f"RSS {gib(r['VmRSS'])}" + (f" ({', '.join(parts)})" if parts else "")
    return text + (f", peak {gib(r['VmHWM'])}" if "VmHWM" in r else "")
