"""Check, before loading, that a model fits in the memory this process may use.

A model that does not fit fails late and badly: the kernel's OOM killer ends the process
half-way through the load (anonymous memory over a cgroup limit), or, when only the
memory-mapped weights overflow, every token re-reads them from disk and decoding crawls. Both
are turned into one clear error up front: ``memory_limit()`` says how many bytes this process
may still use and why, ``MemoryEstimate`` adds up what the load will add, and
``MemoryEstimate.check`` compares the two.

Standard library only (no torch), so it is cheap to import in a process that only checks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Paths are module constants so tests can point them at a fake tree.
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
PROC_MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")  # v2 here (unified) or in ./unified (hybrid); v1 in ./memory
ENV_LIMIT = "LLAMA_MPI_MEMORY_LIMIT"  # bytes, or with a binary suffix: 512M, 21G, 1.5GiB

# Activations, scratch buffers, allocator slack and communication buffers the load and the
# first steps still add. The interpreter, torch and everything already allocated are not in
# it: they are part of the cgroup's / the system's current usage, already subtracted from the
# limit.
RUNTIME_ALLOWANCE = 512 * MiB

# cgroup v1 writes "unlimited" as PAGE_COUNTER_MAX pages (9223372036854771712 with 4 KiB
# pages); anything this large is no limit.
_V1_UNLIMITED = 1 << 62
_SUFFIX = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}


class MemoryBudgetError(MemoryError):
    """The model, as configured, needs more memory than this process may use.

    A MemoryError because that is what it is (raised before any allocation fails); callers
    that report load errors should list it beside GGUFError/ValueError.
    """


def parse_size(text: str) -> int:
    """'21474836480', '21G', '21GiB', '1.5g', '512M' -> bytes. Suffixes are binary (K = 1024),
    as in cgroup files and docker's --memory; a trailing 'B' or 'iB' is allowed."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if m is None or (value := float(m.group(1)) * _SUFFIX[m.group(2).upper()]) < 1:
        raise ValueError(f"{text!r} is not a memory size (bytes, or a number with K/M/G/T)")
    return int(value)


def gib(n: int) -> str:
    """Bytes for a message: '9.8 GiB', or '307 MiB' below 1 GiB (where a tenth is too coarse)."""
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


# --- what this process may use -----------------------------------------------------------------


@dataclass(frozen=True)
class _Bound:
    available: int  # bytes this process may still add
    source: str  # where the figure comes from, for messages


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None or not text.strip().isdigit():
        return None  # missing, or "max"
    return int(text)


def read_stat(path: Path) -> dict[str, int]:
    """A 'key value' file (memory.stat, /proc/meminfo without the kB) as a dict."""
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _own_cgroups() -> tuple[str | None, str | None]:
    """(v2 path, v1 memory-controller path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in (_read(PROC_SELF_CGROUP) or "").splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _levels(mount: Path, path: str) -> Iterator[Path]:
    """This cgroup's directory and every parent up to the mount.

    Without a cgroup namespace a container sees its host path (/docker/<id>) in
    /proc/self/cgroup but has its own cgroup mounted at the root: the missing directories are
    skipped and the mount itself, visited last, is the right one.
    """
    d = mount / path.strip("/")
    while True:
        yield d
        if d == mount or mount not in d.parents:
            return
        d = d.parent


def _in_use(usage: int, stat: dict[str, int], v1: bool) -> int:
    """The part of a cgroup's usage that is not free for the taking.

    Page cache is charged to the cgroup, but clean, unmapped cache (files read earlier, or the
    weights of a previous run of the server in the same container) is reclaimed before the
    limit is enforced, so it counts as available. Mapped file pages are in use by a running
    process (another rank's weights, shared libraries): reclaiming them makes that process
    re-read them from disk, so they count as used. Shared memory (tmpfs, /dev/shm) is file
    cache that cannot be dropped without swap: used.
    """
    cache, mapped, shmem = (("total_cache", "total_mapped_file", "total_shmem") if v1
                            else ("file", "file_mapped", "shmem"))
    # mapped and shmem overlap (mapped shared memory is in both): the larger is a lower bound
    # of their union, so nothing is counted twice
    pinned = max(stat.get(mapped, 0), stat.get(shmem, 0))
    reclaimable = max(0, stat.get(cache, 0) - pinned)
    return max(0, usage - reclaimable)


def _cgroup_bounds() -> list[_Bound]:
    """One bound per limited level of this process's cgroups (v2 and the v1 memory controller)."""
    v2_path, v1_path = _own_cgroups()
    bounds: list[_Bound] = []
    v2_mount = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else (
        CGROUP_ROOT / "unified")
    if v2_path is not None:
        for d in _levels(v2_mount, v2_path):
            usage = _read_int(d / "memory.current")
            if usage is None:
                continue
            used = _in_use(usage, read_stat(d / "memory.stat"), v1=False)
            # memory.high is a soft limit, but above it the kernel throttles and reclaims hard:
            # for a model server that is as bad as the hard limit.
            for name in ("memory.max", "memory.high"):
                limit = _read_int(d / name)
                if limit is not None:
                    source = f"cgroup v2 {name} {gib(limit)} of {d}, {gib(used)} in use"
                    bounds.append(_Bound(max(0, limit - used), source))
    if v1_path is not None:
        for d in _levels(CGROUP_ROOT / "memory", v1_path):
            limit, usage = (_read_int(d / "memory.limit_in_bytes"),
                            _read_int(d / "memory.usage_in_bytes"))
            if limit is None or usage is None or limit >= _V1_UNLIMITED:
                continue
            used = _in_use(usage, read_stat(d / "memory.stat"), v1=True)
            source = f"cgroup v1 memory.limit_in_bytes {gib(limit)} of {d}, {gib(used)} in use"
            bounds.append(_Bound(max(0, limit - used), source))
    return bounds


def _system_bound() -> _Bound:
    """What the machine has left: MemAvailable, less file pages other processes have mapped.

    MemAvailable is the kernel's estimate of what can be allocated without swapping: free
    memory plus page cache and slab it could reclaim. It counts all file cache as available,
    also pages that running processes have mapped (another rank's weights); those are subtracted,
    as in the cgroup case. Shmem is part of Mapped when mapped but not part of MemAvailable, so
    only Mapped - Shmem is taken off (an underestimate of mapped file pages, never a double count).
    """
    info = read_stat(PROC_MEMINFO)
    if "MemAvailable" in info:
        mapped_files = max(0, info.get("Mapped", 0) - info.get("Shmem", 0)) * KiB
        avail = max(0, info["MemAvailable"] * KiB - mapped_files)
        return _Bound(avail, f"MemAvailable {gib(info['MemAvailable'] * KiB)} in {PROC_MEMINFO}, "
                             f"less {gib(mapped_files)} of files mapped by running processes")
    try:  # not Linux, or /proc not mounted: all physical memory is the best guess
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 0
    return _Bound(total, "physical memory (sysconf)")


def memory_limit() -> tuple[int, str]:
    """(bytes this process may still add, where that figure comes from).

    The tightest of: every limited level of its cgroup (v2 memory.max / memory.high, v1
    memory.limit_in_bytes), each less what that cgroup already uses, and the machine's
    MemAvailable. What the process has already allocated is part of that usage, so the result
    is headroom for what a load is about to add. ``LLAMA_MPI_MEMORY_LIMIT`` replaces all of it.
    """
    env = os.environ.get(ENV_LIMIT, "").strip()
    if env:
        try:
            return parse_size(env), f"{ENV_LIMIT}={env}"
        except ValueError as e:
            raise ValueError(f"{ENV_LIMIT}: {e}") from None
    best = min([*_cgroup_bounds(), _system_bound()], key=lambda b: b.available)
    return best.available, best.source


# --- what a model needs ------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """What loading a model will add, in bytes.

    ``mapped`` bytes stay in the GGUF file's page cache (weights used in place from the
    memory map); everything else is anonymous memory (weights copied or dequantized out of the
    file, the KV pool, the runtime allowance, ``other`` named parts).

    Both kinds count against the limit. Anonymous memory over a limit gets the process killed.
    Mapped pages over it are never fatal (the kernel drops clean file pages and faults them
    back in), but then each decoding step re-reads weights from disk: orders of magnitude
    slower, so it is refused too. A cgroup charges the page cache its processes fault in to the
    cgroup, so mapped weights are within memory.max / memory.limit_in_bytes just like copied
    ones. (If another process on the machine already has the same file pages mapped, they are
    shared and this over-counts; the env override is the way out.)
    """

    mapped_weights: int = 0
    copied_weights: int = 0
    kv_pool: int = 0
    runtime: int = RUNTIME_ALLOWANCE
    other: dict[str, int] = field(default_factory=dict)  # more anonymous parts, by name

    @property
    def mapped(self) -> int:
        return self.mapped_weights

    @property
    def anonymous(self) -> int:
        return self.copied_weights + self.kv_pool + self.runtime + sum(self.other.values())

    @property
    def total(self) -> int:
        return self.mapped + self.anonymous

    def _anonymous_parts(self) -> list[tuple[str, int]]:
        return [("KV pool", self.kv_pool), ("runtime", self.runtime), *self.other.items()]

    def describe(self) -> str:
        """For the load log: 'weights 9.8 GiB mapped + 410 MiB copied, KV pool 307 MiB, ...'."""
        weights = f"weights {gib(self.mapped_weights)} mapped + {gib(self.copied_weights)} copied"
        return ", ".join([weights, *(f"{name} {gib(n)}" for name, n in self._anonymous_parts())])

    def check(self, limit: int, source: str, path: str | os.PathLike) -> None:
        """Raise MemoryBudgetError unless everything fits in ``limit`` bytes (see the class doc
        for why mapped bytes count)."""
        if self.total <= limit:
            return
        if self.anonymous > limit:
            why = "the copied part alone is over it, so the process would be killed while loading"
        else:
            why = ("the weights would not stay in memory and every token would re-read them from "
                   "disk")
        parts = "; ".join([f"weights: {gib(self.mapped_weights)} mapped from the file + "
                           f"{gib(self.copied_weights)} copied",
                           *(f"{name}: {gib(n)}" for name, n in self._anonymous_parts())])
        raise MemoryBudgetError(
            f"{os.fspath(path)}: needs about {gib(self.total)} ({parts}) "
            f"but this process may use {gib(limit)} ({source}); {why}. Lower n_ctx, use a smaller "
            f"quantization or more ranks (or set {ENV_LIMIT} to override the limit).")


def ensure_fits(estimate: MemoryEstimate, path: str | os.PathLike) -> tuple[int, str]:
    """``memory_limit()`` then ``estimate.check``; returns the limit and its source for the log."""
    limit, source = memory_limit()
    estimate.check(limit, source, path)
    return limit, source
