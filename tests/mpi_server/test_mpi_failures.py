"""``mpirun`` jobs that go wrong: a stopped rank, a start-up error on every rank.

A stopped (SIGSTOP) rank is found by the heartbeat, not by a collective timing out:
``/health`` turns 503 within a few seconds and the job ends, naming the rank, within
``heartbeat_timeout`` (set to 4 s here; ``collective_timeout`` stays at its 300 s default).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.models.test_tensor_walk import plant_nan
from tests.mpi_server.server_process import free_port
from tests.mpi_server.test_mpi_server import BIN, CONFIG, start, wait_ready

HEARTBEAT_S = 4.0


@pytest.fixture(scope="module")
def tiny(mpi_tiny_model: Path) -> Path:
    return mpi_tiny_model


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _parent(pid)
    return False


def rank_pid(job: subprocess.Popen, rank: int) -> int:
    """The pid of ``rank`` among the processes launched by ``job`` (mpirun)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if (b"llama-mpi-server" in cmd and f"PMI_RANK={rank}".encode() in env
                    and _descends_from(pid, job.pid)):
                return pid
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no process of rank {rank} in the job")


def job_cmd(model: Path, port: int, tmp_path: Path, np: int = 2) -> list[str]:
    config = tmp_path / "job.yaml"
    config.write_text(CONFIG.read_text() + f"\nheartbeat_timeout: {HEARTBEAT_S}\n")
    return [str(BIN / "mpirun"), "-np", str(np), str(BIN / "llama-mpi-server"), "--config",
            str(config), "-m", str(model), "--port", str(port), "-c", "1024"]


def health(url: str) -> tuple[int, dict]:
    r = httpx.get(f"{url}/health", timeout=2)
    return r.status_code, r.json()


def ended(job: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, _ = job.communicate()
        pytest.fail(f"the job did not end within {timeout} s:\n{out}")
    return out


def _stop_rank_and_watch(job, url: str, rank: int) -> tuple[list[tuple[float, int]], float, str]:
    pid = rank_pid(job, rank)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    probes = []
    try:
        while job.poll() is None and time.monotonic() - t0 < HEARTBEAT_S + 10:
            try:
                probes.append((time.monotonic() - t0, health(url)[0]))
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        out = ended(job, timeout=HEARTBEAT_S + 20)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    return probes, time.monotonic() - t0, out


def test_a_stopped_worker_turns_health_503_and_ends_the_job_naming_it(tiny, tmp_path):
    port = free_port()
    job = start(job_cmd(tiny, port, tmp_path))
    url = f"http://127.0.0.1:{port}"
    wait_ready(job, url)
    assert health(url) == (200, {"status": "ok"})
    probes, elapsed, out = _stop_rank_and_watch(job, url, rank=1)
    assert any(code == 503 for _, code in probes), probes
    first_503 = min(t for t, code in probes if code == 503)
    assert first_503 < HEARTBEAT_S, probes
    assert elapsed < HEARTBEAT_S + 6, out
    assert job.returncode != 0
    assert "rank 0: rank 1 has sent no heartbeat for" in out, out


def test_a_stopped_rank_0_ends_the_job_naming_it(tiny, tmp_path):
    port = free_port()
    job = start(job_cmd(tiny, port, tmp_path))
    wait_ready(job, f"http://127.0.0.1:{port}")
    pid = rank_pid(job, 0)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    out = ended(job, timeout=HEARTBEAT_S + 20)
    assert time.monotonic() - t0 < HEARTBEAT_S + 6, out
    assert job.returncode != 0
    assert "rank 1: rank 0 has sent no heartbeat for" in out, out


def test_a_start_up_error_on_every_rank_is_said_once_without_traceback(tiny, tmp_path):
    job = start(job_cmd(tiny, free_port(), tmp_path, np=3))  # 8 heads: 3 ranks cannot split
    out = ended(job, timeout=120)
    assert job.returncode != 0
    assert out.count("3 ranks cannot split") == 1, out
    assert "Traceback" not in out, out


def test_a_bad_model_file_under_mpirun_is_said_once(tmp_path):
    if not (BIN / "mpirun").exists():
        pytest.skip("no mpirun next to the interpreter (pip install mpich)")
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model\n")
    job = start(job_cmd(junk, free_port(), tmp_path))
    out = ended(job, timeout=120)
    assert job.returncode != 0
    assert out.count("not a GGUF file") == 1, out
    assert "Traceback" not in out, out


def test_check_tensors_finds_a_nan_in_an_expert_under_mpirun(tiny, tmp_path):
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(tiny.read_bytes())
    plant_nan(bad, "blk.1.ffn_up_exps.weight")  # expert 0: rank 0's shard
    cmd = job_cmd(bad, free_port(), tmp_path)
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(job_yaml.read_text().replace("check_tensors: false",
                                                     "check_tensors: true"))
    job = start(cmd)
    out = ended(job, timeout=120)
    assert job.returncode != 0
    assert out.count("check_tensors: blocks.1.ffn.experts.gate_up holds NaN or inf") == 1, out
    assert "rank 0: check_tensors" in out, out
