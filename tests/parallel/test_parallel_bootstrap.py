"""init_parallel: ranks, cpu device, threads per rank, and the torch_npu error message."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from llama_mpi.parallel.bootstrap import available_cores, init_parallel, threads_per_rank
from llama_mpi.parallel.communicator import SingleProcessCommunicator
from llama_mpi.parallel.device import resolve_device

NPU_MSG = re.compile(
    r"^device 'npu' requested but torch_npu could not be imported: .+\. "
    r"Install llama-mpi\[npu\] and CANN$"
)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_launcher(monkeypatch):
    for var in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(var, raising=False)
    for var in ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` fail


def test_threads_split_cores_between_local_ranks():
    assert threads_per_rank(4, cores=16) == 4
    assert threads_per_rank(3, cores=2) == 1  # never 0


def test_without_launcher_is_one_rank_on_cpu(no_launcher, restore_threads):
    ctx = init_parallel()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_size) == (0, 1, 0, 1)
    assert ctx.device == torch.device("cpu")
    assert isinstance(ctx.comm, SingleProcessCommunicator)
    assert ctx.n_threads == torch.get_num_threads() == available_cores()


def test_explicit_thread_count_wins(no_launcher, restore_threads):
    assert init_parallel(n_threads=1).n_threads == torch.get_num_threads() == 1


def test_npu_without_torch_npu_says_what_to_install(no_launcher, no_torch_npu, restore_threads):
    with pytest.raises(RuntimeError) as info:
        init_parallel(device="npu")
    assert NPU_MSG.match(str(info.value)), str(info.value)


def test_ascend_visible_devices_selects_npu(no_launcher, no_torch_npu, monkeypatch):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match="torch_npu could not be imported"):
        resolve_device("auto")


def test_under_mpirun_threads_are_cores_per_local_rank(mpi_runner):
    res = mpi_runner(2, "worker_bootstrap.py", timeout=60)
    assert res.returncode == 0, res.output
    infos = [json.loads(m) for m in re.findall(r"BOOT (\{[^\n]*\})", res.output)]
    assert sorted(i["rank"] for i in infos) == [0, 1], res.output
    for info in infos:
        assert info["world_size"] == info["local_size"] == 2
        assert info["local_rank"] == info["rank"]
        assert info["device"] == "cpu"
        assert info["comm"] == "MPICommunicator"
        expected = max(1, info["cores"] // 2)
        assert info["n_threads"] == info["torch_threads"] == expected
