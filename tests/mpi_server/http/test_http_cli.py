"""``llama-server`` end to end in a subprocess with a fake ``engine_factory``: /health goes
from 503 "loading" to 200, requests are served, SIGTERM/SIGINT drain and exit 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[3]

# Runs in the child: installs a fake engine_factory, then the real CLI.
CHILD = """
import sys, time, types
from tests.mpi_server.fake_engine import FakeEngine, FakeTokenizer, fake_chat_to_ids, VOCAB

class Engine(FakeEngine):
    async def shutdown(self, drain_timeout=10.0):
        print("ENGINE-SHUTDOWN", flush=True)

def build_engine(config):
    time.sleep(1.0)  # a slow model load: the server must already answer /health
    return Engine(config.n_ctx), FakeTokenizer(), fake_chat_to_ids, VOCAB, config.n_ctx

mod = types.ModuleType("llama_mpi.mpi_server.engine_factory")
mod.build_engine = build_engine
sys.modules[mod.__name__] = mod
from llama_mpi.mpi_server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_lifecycle(sig: signal.Signals) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, "--port", str(port), "-a", "tiny", "-c", "512"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(base + "/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.json() == {"status": "loading"}
            time.sleep(0.05)
        assert seen and seen[-1] == 200, seen
        assert 503 in seen  # uvicorn was up before the model finished loading
        r = httpx.post(base + "/v1/chat/completions", timeout=10, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["choices"][0]["message"]["content"] == "Hello from fake"
        # the seed document's client names the model its own way: served all the same
        r = httpx.post(base + "/v1/chat/completions", timeout=10, json={
            "model": "DeepSeek-V2-Lite", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "ENGINE-SHUTDOWN" in out


def _wait_ready(base: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("server did not become ready")


def test_strict_model_name_flag_restores_the_404() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, "--port", str(port), "-a", "tiny", "-c", "512",
         "--strict-model-name"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        _wait_ready(base, proc)
        body = {"model": "DeepSeek-V2-Lite", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(base + "/v1/chat/completions", timeout=10, json=body)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        body["model"] = "tiny"
        assert httpx.post(base + "/v1/chat/completions", timeout=10, json=body).status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
