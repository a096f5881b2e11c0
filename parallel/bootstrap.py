"""Start-up for one rank: ranks from MPI, device, torch threads, communicator, fail-fast.

Outside a launcher (plain `python`), MPI is never imported and the world is one rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .communicator import CommKind, Communicator, make_communicator
from .device import resolve_device
from .guard import install_excepthook

# Variables that MPICH/Intel MPI (PMI), Open MPI and PMIx launchers put in each rank's env.
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    device: torch.device
    comm: Communicator
    n_threads: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def launched_under_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


def available_cores() -> int:
    """CPU cores this process may run on (affinity mask, else cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank(local_size: int, cores: int | None = None) -> int:
    # torch under mpirun starts with 1 thread; split the node's cores between its ranks.
    return max(1, (cores if cores is not None else available_cores()) // max(1, local_size))


def init_parallel(
    device: str = "auto",
    n_threads: int | None = None,
    backend: CommKind = "auto",
    timeout: float = 60.0,
    fail_fast: bool = True,
) -> ParallelContext:
    """Set up this rank; call once per process, before any collective.

    `timeout` bounds every collective (the job aborts past it). `fail_fast` installs an
    excepthook so an uncaught exception on any rank aborts the job instead of hanging it.
    """
    mpi_comm = None
    rank, world_size, local_rank, local_size = 0, 1, 0, 1
    if launched_under_mpi():
        from mpi4py import MPI

        mpi_comm = MPI.COMM_WORLD
        rank, world_size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
    threads = n_threads if n_threads is not None else threads_per_rank(local_size)
    torch.set_num_threads(threads)
    dev = resolve_device(device, local_rank)
    comm = make_communicator(backend, dev, mpi_comm=mpi_comm, timeout=timeout)
    if fail_fast and world_size > 1:
        install_excepthook()  # after init_process_group, which wraps sys.excepthook itself
    return ParallelContext(rank, world_size, local_rank, local_size, dev, comm, threads)
