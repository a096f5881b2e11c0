"""Fixtures shared by the HTTP tests: an app over the fake engine, in process."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.mpi_server.fake_engine import FakeEngine, make_app


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    return TestClient(make_app(engine))
