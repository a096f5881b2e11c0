"""``mpirun -np 2 llama-mpi-server`` behind the openai client: same greedy text (and the same
JSON-schema-constrained text) as the single-process server, clean SIGTERM shutdown, and a
failing rank ends the job promptly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.mpi_server.server_process import free_port

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "default.yaml"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(proc)
    pytest.fail("server did not become ready")


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> tuple[int, str]:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"server did not stop within {timeout} s:\n{out}")
    return proc.returncode, out


def server_cmd(model: Path, port: int, np: int = 0) -> list[str]:
    args = ["--config", str(CONFIG), "-m", str(model), "--port", str(port), "-c", "1024"]
    if np:
        return [str(BIN / "mpirun"), "-np", str(np), str(BIN / "llama-mpi-server"), *args]
    return [str(BIN / "llama-server"), *args]


def greedy_texts(url: str) -> list[str]:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    return [client.completions.create(model="tiny.gguf", prompt=p, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
            for p in PROMPTS]


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "n"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "kind": {"enum": ["a", "b", "c"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


def constrained_texts(url: str) -> list[str]:
    """One JSON-schema request greedy and one seeded: the masks are rank 0's alone."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    return [client.chat.completions.create(
        model="tiny.gguf", messages=[{"role": "user", "content": "json"}], max_tokens=200,
        response_format=fmt, **sampling).choices[0].message.content
        for sampling in ({"temperature": 0}, {"seed": 7})]


@pytest.fixture(scope="module")
def model(mpi_tiny_model: Path) -> Path:
    return mpi_tiny_model


def test_mpi_server_greedy_text_equals_single_process_server(model):
    single_port, mpi_port = free_port(), free_port()
    single = start(server_cmd(model, single_port))
    mpi = start(server_cmd(model, mpi_port, np=2))
    try:
        wait_ready(single, f"http://127.0.0.1:{single_port}")
        wait_ready(mpi, f"http://127.0.0.1:{mpi_port}")
        want = greedy_texts(f"http://127.0.0.1:{single_port}")
        got = greedy_texts(f"http://127.0.0.1:{mpi_port}")
        want_json = constrained_texts(f"http://127.0.0.1:{single_port}")
        got_json = constrained_texts(f"http://127.0.0.1:{mpi_port}")
    finally:
        code_single, _ = stop(single)
        code_mpi, out = stop(mpi)
    assert got == want
    assert got_json == want_json
    assert all(json.loads(t).keys() == SCHEMA["properties"].keys() for t in got_json)
    assert all(len(t) > 0 for t in got)
    assert code_single == 0
    assert code_mpi == 0, out  # SIGTERM to mpirun shut every rank down cleanly


def test_rank_failing_mid_decode_ends_the_job_within_30s(model):
    port = free_port()
    cmd = server_cmd(model, port, np=2)
    cmd[cmd.index(str(BIN / "llama-mpi-server"))] = sys.executable  # the same, plus a hook:
    cmd[4:4] = ["-m", "tests.mpi_server.faulty_server", "1", "3"]  # rank 1 fails at step 3
    proc = start(cmd, env={"PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url)
    t0 = time.monotonic()
    try:
        httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 32},
                   timeout=30)
    except httpx.HTTPError:
        pass  # the server may die before it answers
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job hung after a rank failed")
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0
    assert "injected failure at step 3" in out
