"""``llama-server`` refuses, before loading, a model + KV pool over its memory budget: one
message with the estimate and the limit, exit 1, no traceback, no OOM kill; within the
budget it comes up. The budget is a real cgroup limit where this machine allows one."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.cgroup_util import create_memory_cgroup
from tests.mpi_server.server_process import free_port, server_executable

MiB = 1 << 20


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from llama_mpi.models.gguf.builder import build_model

    return build_model(tmp_path_factory.mktemp("mem") / "tiny-q8_0.gguf", preset="tiny",
                       ftype="q8_0")


def start(model: Path, n_ctx: int, env: dict[str, str] | None = None,
          wrap=lambda cmd: cmd) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = wrap([server_executable(), "-m", str(model), "-c", str(n_ctx), "-np", "1",
                "--port", str(port)])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    return proc, f"http://127.0.0.1:{port}"


def refused_output(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    return out


def test_over_the_env_budget_is_refused_with_the_figures(model):
    proc, _ = start(model, 4096, env={"LLAMA_MPI_MEMORY_LIMIT": "64M"})
    out = refused_output(proc)
    assert "model loading failed: " in out and "Traceback" not in out, out
    assert f"{model}: needs about " in out and "KV pool: " in out, out
    assert "but this process may use 64 MiB (LLAMA_MPI_MEMORY_LIMIT" in out, out


def wait_healthy(proc: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(proc.communicate()[0])


def test_real_cgroup_limit_refuses_a_pool_too_big_and_serves_one_that_fits(model):
    """Tiny's latent cache is 640 bytes a token: 4M tokens (2.5 GiB) cannot fit in 1.5 GiB,
    4096 tokens can. Without the check, the pool's pages would get the server OOM-killed."""
    cg = create_memory_cgroup(1536 * MiB)
    if isinstance(cg, str):
        pytest.skip(f"no real cgroup here: {cg}")
    with cg:
        proc, _ = start(model, 4 << 20, wrap=cg.command)
        out = refused_output(proc)
        assert "needs about" in out and "cgroup" in out and "Traceback" not in out, out
        assert cg.oom_kills() == 0
    cg = create_memory_cgroup(1536 * MiB)
    assert not isinstance(cg, str)
    with cg:
        proc, base = start(model, 4096, wrap=cg.command)
        try:
            wait_healthy(proc, base)
            r = httpx.post(base + "/v1/completions", timeout=60,
                           json={"prompt": "hi", "max_tokens": 4})
            assert r.status_code == 200, r.text
        finally:
            proc.terminate()
            proc.communicate(timeout=60)
        assert cg.oom_kills() == 0
