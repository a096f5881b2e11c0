"""Run commands under a real cgroup memory limit, for tests that must see the kernel enforce it.

    proc, note = run_with_memory_limit([sys.executable, "-c", "..."], 256 * MiB)
    if proc is None:
        pytest.skip(note)  # note says precisely why no cgroup could be made

    with create_memory_cgroup(21 * GiB) as cg:  # or a str (the reason) when not possible
        server = subprocess.Popen(cg.command(argv))
        ...; cg.peak(), cg.oom_kills()

A child cgroup is made with a unique name, the command joins it through a tiny shell wrapper
(``echo $$ > cgroup.procs; exec cmd``: no preexec_fn, safe with threads) and the cgroup is
removed afterwards, killing anything the command left running in it. Needs root (or a
delegated cgroup) and a writable cgroup filesystem with the memory controller:

- cgroup v2: a child of the nearest ancestor of this process's cgroup that has ``memory`` in
  its cgroup.subtree_control (v2 forbids processes in a cgroup whose children have controllers,
  so the child cannot go below our own cgroup unless that already has memory enabled);
  memory.max = limit, memory.swap.max = 0.
- cgroup v1 (also a hybrid host, where v2 is mounted at /sys/fs/cgroup/unified without the
  memory controller): a child of this process's memory cgroup (v1 allows processes at every
  level); memory.limit_in_bytes = memory.memsw.limit_in_bytes = limit.

Either way the limit counts the page cache that the command faults in, as in production.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
_names = itertools.count()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _events(path: Path) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


@dataclass
class MemoryCgroup:
    path: Path
    version: int  # 1 or 2
    limit: int

    def command(self, cmd: Sequence[str | os.PathLike]) -> list[str]:
        """``cmd`` wrapped so that it runs inside this cgroup (pass to Popen / run)."""
        procs = self.path / "cgroup.procs"
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs),
                *(os.fspath(c) for c in cmd)]

    def usage(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return int(_read(self.path / name) or 0)

    def peak(self) -> int | None:
        """Highest usage so far (v2 needs memory.peak, Linux 5.19+)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        text = _read(self.path / name).strip()
        return int(text) if text.isdigit() else None

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return _events(self.path / name).get("oom_kill", 0)

    def pids(self) -> list[int]:
        return [int(p) for p in _read(self.path / "cgroup.procs").split()]

    def remove(self) -> None:
        """Kill what is still running in it (only processes this cgroup's commands started)
        and delete the cgroup."""
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"could not remove cgroup {self.path}: still busy")

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _own_paths() -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) of this process."""
    v2 = v1 = None
    for line in _read(PROC_SELF_CGROUP).splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and not controllers:
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(mount: Path, path: str) -> list[Path]:
    """Existing directories from this cgroup up to the mount (nearest first)."""
    d, out = mount / path.strip("/"), []
    while True:
        if d.is_dir():
            out.append(d)
        if d == mount or mount not in d.parents:
            return out
        d = d.parent


def _make(parent: Path, version: int, limit: int, settings: list[tuple[str, str]]
          ) -> MemoryCgroup | str:
    path = parent / f"llama-mpi-test-{os.getpid()}-{next(_names)}"
    try:
        path.mkdir()
    except OSError as e:
        return f"cannot create a cgroup v{version} under {parent}: {e.strerror}"
    cg = MemoryCgroup(path, version, limit)
    for name, value in settings:
        f = path / name
        if not f.exists():
            continue  # e.g. no swap accounting
        try:
            f.write_text(value)
        except OSError as e:
            cg.remove()
            return f"cannot set {name}={value} in cgroup v{version} {path}: {e.strerror}"
    return cg


def create_memory_cgroup(limit: int) -> MemoryCgroup | str:
    """A new child cgroup with a hard memory limit of ``limit`` bytes, or why there can't be.
    Remove it when done (``with``, or ``.remove()``)."""
    v2_path, v1_path = _own_paths()
    reasons = []
    v2_mount = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else (
        CGROUP_ROOT / "unified")
    if v2_path is not None and (v2_mount / "cgroup.controllers").exists():
        if "memory" not in _read(v2_mount / "cgroup.controllers").split():
            reasons.append(f"cgroup v2 at {v2_mount} has no memory controller (controllers: "
                           f"{_read(v2_mount / 'cgroup.controllers').strip() or 'none'})")
        else:
            parent = next((d for d in _ancestors(v2_mount, v2_path)
                           if "memory" in _read(d / "cgroup.subtree_control").split()), None)
            if parent is None:
                reasons.append(f"cgroup v2: memory is in no cgroup.subtree_control from "
                               f"{v2_mount / v2_path.strip('/')} up to {v2_mount}")
            else:
                made = _make(parent, 2, limit, [("memory.max", str(limit)),
                                                ("memory.swap.max", "0")])
                if isinstance(made, MemoryCgroup):
                    return made
                reasons.append(made)
    v1_mount = CGROUP_ROOT / "memory"
    if v1_path is not None and (v1_mount / "memory.limit_in_bytes").exists():
        own = _ancestors(v1_mount, v1_path)[0]  # the mount itself exists at least
        made = _make(own, 1, limit, [("memory.limit_in_bytes", str(limit)),
                                     ("memory.memsw.limit_in_bytes", str(limit))])
        if isinstance(made, MemoryCgroup):
            return made
        reasons.append(made)
    elif v1_path is not None:
        reasons.append(f"cgroup v1: no memory controller mounted at {v1_mount}")
    if not reasons:
        reasons.append(f"no memory cgroup for this process in {PROC_SELF_CGROUP}")
    return "; ".join(reasons)


_probe: list[str | None] = []


def unavailable_reason() -> str | None:
    """None when memory cgroups can be made here, else why not (probed once per process)."""
    if not _probe:
        made = create_memory_cgroup(256 << 20)
        if isinstance(made, MemoryCgroup):
            made.remove()
            _probe.append(None)
        else:
            _probe.append(made)
    return _probe[0]


def run_with_memory_limit(cmd: Sequence[str | os.PathLike], limit: int, **run_kwargs: Any
                          ) -> tuple[subprocess.CompletedProcess | None, str]:
    """``subprocess.run(cmd, **run_kwargs)`` inside a new cgroup limited to ``limit`` bytes.

    Returns (the CompletedProcess, a note with the cgroup, its peak usage and OOM kills), or
    (None, why no cgroup could be made). A command killed by the OOM killer returns normally
    with returncode -9.
    """
    cg = create_memory_cgroup(limit)
    if isinstance(cg, str):
        return None, cg
    with cg:
        proc = subprocess.run(cg.command(cmd), **run_kwargs)
        peak = cg.peak()
        note = (f"cgroup v{cg.version} {cg.path}, limit {limit} B, peak "
                f"{'unknown' if peak is None else f'{peak} B'}, {cg.oom_kills()} OOM kills")
    return proc, note
