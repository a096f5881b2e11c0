"""Fixtures shared by the server tests: an app over the fake engine, in process; the tiny
model the ``mpirun`` tests serve."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llama_mpi.models.gguf.builder import build_model
from tests.mpi_server.fake_engine import FakeEngine, make_app


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    return TestClient(make_app(engine))


@pytest.fixture(scope="session")
def mpi_tiny_model(tmp_path_factory) -> Path:
    """The tiny f32 model of the ``mpirun`` server tests (built once per session)."""
    if not (Path(sys.executable).parent / "mpirun").exists():
        pytest.skip("no mpirun next to the interpreter (pip install mpich)")
    return build_model(tmp_path_factory.mktemp("m") / "tiny.gguf", preset="tiny", ftype="f32",
                       seed=2)
