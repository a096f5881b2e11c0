"""Every collective matches numpy, for the MPI and gloo communicators at np 2 and 4."""

from __future__ import annotations

import re

import pytest

SEED = 1234
CHECKS = [
    *(f"all_reduce_{d}" for d in ("fp32", "bf16", "fp16")),
    *(f"all_gather_dim{k}_{d}" for k in (0, 1) for d in ("fp32", "bf16")),
    *(f"all_to_all_{d}" for d in ("fp32", "bf16")),
    *(f"all_to_all_counts_{d}" for d in ("fp32", "bf16")),
    *(f"all_to_all_reply{c}_{d}" for c in ("", "_counts") for d in ("fp32", "bf16")),
    "broadcast_object",
    "broadcast_fp32",
    "broadcast_bf16",
    "barrier",
]
CONFIGS = [("mpi", 2), ("mpi", 4), ("gloo", 2), ("gloo", 4)]


@pytest.fixture(scope="module", params=CONFIGS, ids=[f"{b}-np{n}" for b, n in CONFIGS])
def collective_run(request, mpi_runner):
    # One launch per (backend, np); the tests below each check one collective's lines.
    backend, np_ = request.param
    return np_, mpi_runner(np_, "worker_collectives.py", backend, str(SEED), timeout=90)


def test_worker_exits_cleanly(collective_run):
    np_, res = collective_run
    assert res.returncode == 0, res.output


@pytest.mark.parametrize("check", CHECKS)
def test_collective_matches_numpy(collective_run, check):
    np_, res = collective_run
    for rank in range(np_):
        # Not anchored: lines of different ranks may interleave in mpirun's merged stdout.
        m = re.search(rf"RESULT rank={rank} {check} (ok|FAIL[^\n]*)", res.output)
        assert m is not None, f"rank {rank} did not report {check}:\n{res.output}"
        assert m.group(1) == "ok", m.group(0)
