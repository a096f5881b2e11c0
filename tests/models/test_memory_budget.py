"""memory_budget: the limit (env override, fake cgroup v1/v2 trees, a real cgroup where one can be
made), the estimate and its error message, resident_bytes."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_mpi.models import memory_budget as mb
from llama_mpi.models import memory_resident as mr
from llama_mpi.models.memory_budget import GiB, MemoryBudgetError, MemoryEstimate, MiB

from .. import cgroup_util

KB = 1024
UNLIMITED_V1 = "9223372036854771712\n"


# --- sizes and the override --------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("123456", 123456), ("21G", 21 * GiB), ("21g", 21 * GiB), ("21GiB", 21 * GiB),
    ("21GB", 21 * GiB), ("512M", 512 * MiB), ("1.5G", 3 * GiB // 2), (" 64 K ", 64 * KB),
    ("2T", 2 << 40),
])
def test_parse_size(text, want):
    assert mb.parse_size(text) == want


@pytest.mark.parametrize("text", ["", "G", "-1G", "21X", "0", "1e9", "twenty"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a memory size"):
        mb.parse_size(text)


def test_env_override_replaces_detection(monkeypatch, tmp_path):
    fake_tree(monkeypatch, tmp_path, cgroup="0::/\n", meminfo_kb=(1 << 20, 0, 0))
    monkeypatch.setenv(mb.ENV_LIMIT, "21G")
    assert mb.memory_limit() == (21 * GiB, "LLAMA_MPI_MEMORY_LIMIT=21G")


def test_bad_env_override_names_the_variable(monkeypatch):
    monkeypatch.setenv(mb.ENV_LIMIT, "lots")
    with pytest.raises(ValueError, match="LLAMA_MPI_MEMORY_LIMIT.*'lots'"):
        mb.memory_limit()


# --- fake cgroup trees -------------------------------------------------------------------------


def fake_tree(monkeypatch, tmp: Path, cgroup: str, files: dict[str, str | int] | None = None,
              meminfo_kb: tuple[int, int, int] = (64 << 20, 0, 0)) -> Path:
    """/proc/self/cgroup, /proc/meminfo (MemAvailable, Mapped, Shmem in kB) and files under a
    fake /sys/fs/cgroup; the module's path constants point there. Returns the cgroup root."""
    monkeypatch.delenv(mb.ENV_LIMIT, raising=False)
    root = tmp / "sys/fs/cgroup"
    root.mkdir(parents=True)
    (tmp / "cgroup").write_text(cgroup)
    avail, mapped, shmem = meminfo_kb
    (tmp / "meminfo").write_text(f"MemTotal:       {avail * 2} kB\nMemAvailable:   {avail} kB\n"
                                 f"Mapped:         {mapped} kB\nShmem:          {shmem} kB\n")
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(str(text))
    monkeypatch.setattr(mb, "CGROUP_ROOT", root)
    monkeypatch.setattr(mb, "PROC_SELF_CGROUP", tmp / "cgroup")
    monkeypatch.setattr(mb, "PROC_MEMINFO", tmp / "meminfo")
    return root


def test_v2_limit_of_a_parent_less_its_usage(monkeypatch, tmp_path):
    root = fake_tree(monkeypatch, tmp_path, "0::/user.slice/app.service\n", {
        "cgroup.controllers": "cpu memory pids",
        "user.slice/memory.max": 8 * GiB,
        "user.slice/memory.current": 2 * GiB,
        "user.slice/app.service/memory.max": "max\n",
        "user.slice/app.service/memory.current": GiB,
    })
    limit, source = mb.memory_limit()
    assert limit == 6 * GiB
    assert source == f"cgroup v2 memory.max 8.0 GiB of {root / 'user.slice'}, 2.0 GiB in use"


def test_v2_memory_high_counts_as_a_limit(monkeypatch, tmp_path):
    fake_tree(monkeypatch, tmp_path, "0::/job\n", {
        "cgroup.controllers": "memory",
        "job/memory.max": 16 * GiB, "job/memory.high": 10 * GiB, "job/memory.current": 0,
    })
    limit, source = mb.memory_limit()
    assert limit == 10 * GiB and "memory.high 10.0 GiB" in source


def test_v2_reclaimable_page_cache_is_available(monkeypatch, tmp_path):
    """Unmapped file cache (a previous run's weights) is free; mapped and shmem pages are not."""
    fake_tree(monkeypatch, tmp_path, "0::/job\n", {
        "cgroup.controllers": "memory",
        "job/memory.max": 21 * GiB,
        "job/memory.current": 12 * GiB,
        # 10 GiB of cache, 3 GiB of it mapped (1 GiB of that mapped shmem)
        "job/memory.stat": f"anon {2 * GiB}\nfile {10 * GiB}\nfile_mapped {3 * GiB}\n"
                           f"shmem {GiB}\ninactive_file {4 * GiB}\n",
    })
    limit, source = mb.memory_limit()
    assert limit == 21 * GiB - (12 - 7) * GiB  # 7 GiB reclaimable: 10 cached - 3 mapped
    assert "5.0 GiB in use" in source


def test_v2_unlimited_falls_back_to_mem_available(monkeypatch, tmp_path):
    fake_tree(monkeypatch, tmp_path, "0::/job\n", {
        "cgroup.controllers": "memory", "job/memory.max": "max", "job/memory.current": GiB,
    }, meminfo_kb=(20 << 20, 3 << 20, 1 << 20))
    limit, source = mb.memory_limit()
    assert limit == (20 - 2) * GiB  # MemAvailable less (Mapped - Shmem)
    assert source.startswith("MemAvailable 20.0 GiB in ") and "less 2.0 GiB of files" in source


def test_mem_available_caps_a_larger_cgroup_limit(monkeypatch, tmp_path):
    fake_tree(monkeypatch, tmp_path, "0::/job\n", {
        "cgroup.controllers": "memory", "job/memory.max": 64 * GiB, "job/memory.current": 0,
    }, meminfo_kb=(12 << 20, 0, 0))
    assert mb.memory_limit() == (12 * GiB, mb.memory_limit()[1])
    assert mb.memory_limit()[1].startswith("MemAvailable")


def test_v1_hierarchy_walks_up_past_unlimited_levels(monkeypatch, tmp_path):
    root = fake_tree(monkeypatch, tmp_path, "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n", {
        "memory/memory.limit_in_bytes": UNLIMITED_V1,
        "memory/memory.usage_in_bytes": 40 * GiB,
        "memory/docker/memory.limit_in_bytes": 24 * GiB,
        "memory/docker/memory.usage_in_bytes": 9 * GiB,
        "memory/docker/memory.stat": f"cache 1\ntotal_cache {5 * GiB}\n"
                                     f"total_mapped_file {GiB}\ntotal_shmem 0\n",
        "memory/docker/abc/memory.limit_in_bytes": UNLIMITED_V1,
        "memory/docker/abc/memory.usage_in_bytes": 4 * GiB,
    })
    limit, source = mb.memory_limit()
    assert limit == 24 * GiB - (9 - 4) * GiB
    assert source == (f"cgroup v1 memory.limit_in_bytes 24.0 GiB of {root / 'memory/docker'}, "
                      "5.0 GiB in use")


def test_v1_container_without_cgroup_namespace_uses_the_mount(monkeypatch, tmp_path):
    """/proc/self/cgroup names the host path, but the container's own cgroup is the mount."""
    root = fake_tree(monkeypatch, tmp_path, "4:memory:/docker/0123abcd\n", {
        "memory/memory.limit_in_bytes": 21 * GiB,
        "memory/memory.usage_in_bytes": GiB,
    })
    limit, source = mb.memory_limit()
    assert limit == 20 * GiB and str(root / "memory") in source


def test_hybrid_host_v2_without_memory_and_v1_memory(monkeypatch, tmp_path):
    """Like this project's CI box: v2 in ./unified without the memory controller."""
    fake_tree(monkeypatch, tmp_path, "4:memory:/sess\n0::/\n", {
        "unified/cgroup.controllers": "hugetlb",
        "memory/sess/memory.limit_in_bytes": 3 * GiB,
        "memory/sess/memory.usage_in_bytes": GiB,
    })
    limit, source = mb.memory_limit()
    assert limit == 2 * GiB and source.startswith("cgroup v1")


def test_no_cgroup_at_all(monkeypatch, tmp_path):
    fake_tree(monkeypatch, tmp_path, "", meminfo_kb=(5 << 20, 0, 0))
    assert mb.memory_limit()[0] == 5 * GiB


def test_usage_over_the_limit_leaves_zero(monkeypatch, tmp_path):
    fake_tree(monkeypatch, tmp_path, "0::/job\n", {
        "cgroup.controllers": "memory", "job/memory.max": GiB, "job/memory.current": 2 * GiB,
    })
    assert mb.memory_limit()[0] == 0


# --- the estimate ------------------------------------------------------------------------------


def estimate(**kw) -> MemoryEstimate:
    parts = dict(mapped_weights=int(9.8 * GiB), copied_weights=int(0.4 * GiB),
                 kv_pool=int(0.3 * GiB))
    return MemoryEstimate(**{**parts, **kw})


def test_estimate_parts_and_describe():
    e = estimate(other={"expert cache": 100 * MiB})
    assert e.mapped == int(9.8 * GiB)
    assert e.anonymous == int(0.4 * GiB) + int(0.3 * GiB) + mb.RUNTIME_ALLOWANCE + 100 * MiB
    assert e.total == e.mapped + e.anonymous
    assert e.describe() == ("weights 9.8 GiB mapped + 410 MiB copied, KV pool 307 MiB, "
                            "runtime 512 MiB, expert cache 100 MiB")
    assert MemoryEstimate(kv_pool=40 * MiB).describe() == (
        "weights 0 MiB mapped + 0 MiB copied, KV pool 40 MiB, runtime 512 MiB")


def test_check_passes_when_everything_fits():
    e = estimate()
    e.check(e.total, "test", "/m.gguf")


def test_check_counts_mapped_bytes_and_says_why():
    e = estimate()
    with pytest.raises(MemoryBudgetError) as info:
        e.check(8 * GiB, "cgroup v2 memory.max 8.0 GiB of /sys/fs/cgroup/job, 0 MiB in use",
                Path("/models/DeepSeek-V2-Lite-Q4_K_M.gguf"))
    msg = str(info.value)
    assert isinstance(info.value, MemoryError)
    assert "\n" not in msg
    assert msg.startswith("/models/DeepSeek-V2-Lite-Q4_K_M.gguf: needs about 11.0 GiB (weights: "
                          "9.8 GiB mapped from the file + 410 MiB copied; KV pool: 307 MiB; "
                          "runtime: 512 MiB) but this process may use 8.0 GiB (cgroup v2 "
                          "memory.max 8.0 GiB of /sys/fs/cgroup/job, 0 MiB in use); ")
    assert "re-read them from disk" in msg
    assert "Lower n_ctx, use a smaller quantization or more ranks" in msg
    assert mb.ENV_LIMIT in msg


def test_check_when_the_copied_part_alone_does_not_fit():
    with pytest.raises(MemoryBudgetError, match="copied part alone is over it.*killed"):
        estimate(kv_pool=4 * GiB).check(4 * GiB, "MemAvailable", "m.gguf")


def test_ensure_fits_uses_the_limit(monkeypatch):
    monkeypatch.setenv(mb.ENV_LIMIT, "12G")
    assert mb.ensure_fits(estimate(), "m.gguf") == (12 * GiB, "LLAMA_MPI_MEMORY_LIMIT=12G")
    monkeypatch.setenv(mb.ENV_LIMIT, "10G")
    with pytest.raises(MemoryBudgetError, match=r"may use 10\.0 GiB \(LLAMA_MPI_MEMORY_LIMIT=10G"):
        mb.ensure_fits(estimate(), "m.gguf")


# --- resident memory ---------------------------------------------------------------------------


def test_resident_bytes_of_this_process():
    r = mr.resident_bytes()
    assert {"VmRSS", "RssAnon", "RssFile", "VmHWM"} <= r.keys()
    assert r["VmRSS"] >= r["RssAnon"] > 0 and r["VmHWM"] >= r["VmRSS"] - 1 * MiB
    assert mr.describe_resident().startswith("RSS ")


def test_resident_bytes_parses_status(monkeypatch, tmp_path):
    (tmp_path / "status").write_text("Name:\tpython\nVmHWM:\t  2097152 kB\nVmRSS:\t  1048576 kB\n"
                                     "RssAnon:\t   524288 kB\nRssFile:\t   524288 kB\n")
    monkeypatch.setattr(mr, "PROC_SELF_STATUS", tmp_path / "status")
    assert mr.resident_bytes() == {"VmRSS": GiB, "RssAnon": GiB // 2, "RssFile": GiB // 2,
                                   "VmHWM": 2 * GiB}
    assert mr.describe_resident() == "RSS 1.0 GiB (anon 512 MiB, file 512 MiB), peak 2.0 GiB"


# --- a real cgroup -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_cgroups():
    reason = cgroup_util.unavailable_reason()
    if reason is not None:
        pytest.skip(f"no real memory cgroup can be made here: {reason}")


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != mb.ENV_LIMIT}


def test_memory_limit_in_a_real_cgroup(real_cgroups):
    limit = 256 * MiB
    code = ("import json; from llama_mpi.models.memory_budget import memory_limit; "
            "print(json.dumps(memory_limit()))")
    proc, note = cgroup_util.run_with_memory_limit([sys.executable, "-c", code], limit,
                                                   capture_output=True, text=True, timeout=60,
                                                   env=child_env())
    assert proc is not None and proc.returncode == 0, (note, proc and proc.stderr)
    got, source = json.loads(proc.stdout)
    # the child's own interpreter is already in the cgroup's usage
    assert limit - 64 * MiB < got <= limit, (got, source, note)
    assert "llama-mpi-test-" in source and ("memory.max" in source
                                            or "memory.limit_in_bytes" in source), source


def test_real_cgroup_kills_anonymous_memory_over_the_limit(real_cgroups):
    proc, note = cgroup_util.run_with_memory_limit(
        [sys.executable, "-c", "b = bytearray(256 << 20); print(len(b))"], 96 * MiB,
        capture_output=True, timeout=60)
    assert proc is not None and proc.returncode == -9, note
    assert "1 OOM kills" in note


def test_real_cgroup_reclaims_a_mapped_file_larger_than_the_limit(real_cgroups, tmp_path):
    """Why mapped weights never OOM but still must fit: the kernel evicts their page cache
    (charged to the cgroup) and reads it again, which works, slowly."""
    path = tmp_path / "weights.bin"
    size, limit = 160 * MiB, 64 * MiB
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * (size >> 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # charge it to the child
    code = ("import mmap, sys\n"
            "f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
            f"print(sum(m[i] for i in range(0, len(m), {mmap.PAGESIZE})))\n")
    cg = cgroup_util.create_memory_cgroup(limit)
    assert isinstance(cg, cgroup_util.MemoryCgroup), cg
    with cg:
        proc = subprocess.run(cg.command([sys.executable, "-c", code, path]),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert cg.oom_kills() == 0
        peak = cg.peak()
        assert peak is None or peak <= limit
