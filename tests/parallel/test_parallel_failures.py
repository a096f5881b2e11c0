"""A failing or stalled rank ends the whole job quickly with a message naming it."""

from __future__ import annotations

import pytest

BACKENDS = ["mpi", "gloo"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_raising_rank_aborts_job(mpi_runner, backend):
    res = mpi_runner(2, "worker_failure.py", "raise", backend, "20", timeout=60)
    assert res.returncode != 0, res.output
    assert res.elapsed < 30, f"took {res.elapsed:.1f} s"
    assert "rank 1 failed: Traceback" in res.output, res.output
    assert "ValueError: injected failure on rank 1" in res.output, res.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_stalled_rank_trips_collective_timeout(mpi_runner, backend):
    res = mpi_runner(2, "worker_failure.py", "stall", backend, "3", timeout=60)
    assert res.returncode != 0, res.output
    assert res.elapsed < 30, f"took {res.elapsed:.1f} s"
    msg = "rank 0: collective all_reduce exceeded 3 s; aborting the job"
    assert msg in res.output, res.output


def test_stalled_rank_trips_timeout_at_np4(mpi_runner):
    res = mpi_runner(4, "worker_failure.py", "stall", "mpi", "3", timeout=60)
    assert res.returncode != 0, res.output
    assert res.elapsed < 30, f"took {res.elapsed:.1f} s"
    assert "collective all_reduce exceeded 3 s; aborting the job" in res.output, res.output
