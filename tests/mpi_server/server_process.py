"""Run a real ``llama-server`` subprocess for end-to-end tests.

``running_server(model, *extra_args)`` starts ``llama-server`` (the console script next to
``sys.executable``) on a free loopback port, waits for ``/health`` to answer 200, yields the
base URL, and on exit sends SIGTERM and checks that the server exits 0 in time. The server's
stdout and stderr go to a log file whose tail is shown whenever something goes wrong.

``tiny_model`` and ``llama_server`` are module-scoped fixtures built on it; a test module
uses them with ``from tests.mpi_server.server_process import llama_server, tiny_model`` or
defines its own around ``running_server`` for other flags.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "default.yaml"
START_TIMEOUT = 60.0  # seconds until /health must answer 200
STOP_TIMEOUT = 20.0  # seconds the server gets to exit after SIGTERM
DEFAULT_ARGS = ("-np", "4", "-c", "4096")


def build_tiny_model(directory: Path, seed: int = 1) -> Path:
    """The tiny random DeepSeek-V2 (byte-level 1024-token vocab), f32, in ``directory``."""
    from llama_mpi.models.gguf.builder import build_model

    return Path(build_model(directory / "tiny-f32.gguf", preset="tiny", ftype="f32", seed=seed))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_executable() -> str:
    sibling = Path(sys.executable).parent / "llama-server"
    if sibling.is_file():
        return str(sibling)
    found = shutil.which("llama-server")
    if found is None:
        raise RuntimeError("llama-server is not installed next to the Python interpreter")
    return found


def _tail(log: Path, limit: int = 6000) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "<no server log>"
    return text[-limit:]


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama-server exited with {proc.returncode} while starting; log:\n"
                        f"{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"llama-server did not become ready within {timeout:.0f} s; log:\n{_tail(log)}")


def _stop(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """SIGTERM, then insist on a clean exit 0 within ``timeout`` (killed otherwise)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"llama-server did not exit within {timeout:.0f} s of SIGTERM; log:\n"
                    f"{_tail(log)}")
    assert code == 0, f"llama-server exited with {code} after SIGTERM; log:\n{_tail(log)}"


@contextmanager
def running_server(
    model: Path,
    *extra_args: str,
    log_dir: Path | None = None,
    start_timeout: float = START_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
) -> Iterator[str]:
    """Serve ``model`` with ``DEFAULT_ARGS`` plus ``extra_args``; yields ``http://host:port``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (log_dir or Path(model).parent) / f"llama-server-{port}.log"
    cmd = [server_executable(), "--config", str(CONFIG), "-m", str(model), "--port", str(port),
           *DEFAULT_ARGS, *extra_args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_ready(proc, url, log, start_timeout)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise
    try:
        yield url
    finally:
        _stop(proc, log, stop_timeout)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per test module (a few seconds)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def llama_server(tiny_model: Path) -> Iterator[str]:
    """Base URL of a real ``llama-server`` (4 slots, 4096-token pool) serving ``tiny_model``."""
    with running_server(tiny_model) as url:
        yield url
