"""Launch small worker scripts under a real `mpirun -np N` with a hard timeout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def find_mpirun() -> str | None:
    # The mpich wheel installs mpirun next to the interpreter; prefer it over a system one.
    sibling = Path(sys.executable).with_name("mpirun")
    if sibling.exists():
        return str(sibling)
    return shutil.which("mpirun")


@dataclass
class MpiResult:
    returncode: int
    output: str  # stdout and stderr together
    elapsed: float


def run_mpi(np: int, script: str, *args: str, timeout: float = 60.0) -> MpiResult:
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("no mpirun found next to sys.executable or on PATH (pip install mpich)")
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", PYTHONUNBUFFERED="1")
    cmd = [mpirun, "-np", str(np), sys.executable, str(HERE / script), *args]
    start = time.monotonic()
    # Own session, so a timeout kills mpirun and every rank it started.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mpirun -np {np} {script} {args} hung for {timeout} s:\n{out}")
    return MpiResult(proc.returncode, out, time.monotonic() - start)


@pytest.fixture(scope="session")
def mpi_runner():
    return run_mpi
