"""Latency of all_reduce / all_to_all for the MPI and gloo communicators.

    mpirun -np 2 .venv/bin/python run/bench_comm.py [--iters 30]

Per-rank payloads of 8 KiB and 8 MiB, float32 and bfloat16; median over iterations of the
slowest rank. "mpi/upcast" is the bf16 all_reduce through an fp32 copy instead of the
bf16 user Op ("mpi"). MPI runs first, then gloo, never interleaved (mixing costs ~4 ms).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from mpi4py import MPI

from llama_mpi.parallel.bootstrap import init_parallel
from llama_mpi.parallel.communicator import Communicator
from llama_mpi.parallel.mpi_communicator import MPICommunicator
from llama_mpi.parallel.torch_dist_communicator import TorchDistCommunicator

SIZES = {"8KiB": 8 << 10, "8MiB": 8 << 20}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _median_us(comm: Communicator, fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):  # warm-up: connections, datatypes, user Op creation
        fn()
    times = []
    for _ in range(iters):
        comm.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # The op is as slow as its slowest rank; one MPI call here is outside the timed loop.
    return MPI.COMM_WORLD.allreduce(statistics.median(times), op=MPI.MAX) * 1e6


def uneven_counts(rows: int, rank: int, world: int) -> list[int]:
    """Split `rows` unevenly over destinations (weights 1..world, rotated by rank)."""
    weights = [(d + rank) % world + 1 for d in range(world)]
    counts = [rows * w // sum(weights) for w in weights]
    counts[-1] += rows - sum(counts)
    return counts


def bench(comm: Communicator, label: str, iters: int) -> list[tuple[str, str, str, str, float]]:
    rows = []
    for size_name, nbytes in SIZES.items():
        for dt_name, dt in DTYPES.items():
            n = nbytes // torch.empty(0, dtype=dt).element_size()
            it = iters if nbytes < (1 << 20) else max(5, iters // 3)
            x = torch.ones(n, dtype=dt)
            us = _median_us(comm, partial(comm.all_reduce, x), it)
            rows.append(("all_reduce", size_name, dt_name, label, us))
            if isinstance(comm, MPICommunicator) and dt is torch.bfloat16:
                comm.bf16_reduce = "upcast"
                us = _median_us(comm, partial(comm.all_reduce, x), it)
                comm.bf16_reduce = "op"
                rows.append(("all_reduce", size_name, dt_name, label + "/upcast", us))
            width = 1024 if n >= 64 * 1024 else 64  # rows of `width` elements
            t = torch.ones(n // width, width, dtype=dt)
            counts = uneven_counts(t.shape[0], comm.rank, comm.world_size)
            us = _median_us(comm, partial(comm.all_to_all, t, counts), it)
            rows.append(("all_to_all", size_name, dt_name, label, us))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    ctx = init_parallel(device="cpu", backend="mpi")
    rows = bench(ctx.comm, "mpi", args.iters)
    ctx.comm.close()
    gloo = TorchDistCommunicator("gloo", mpi_comm=MPI.COMM_WORLD)
    rows += bench(gloo, "gloo", args.iters)
    gloo.close()
    if ctx.rank == 0:
        print(f"world={ctx.world_size} threads/rank={ctx.n_threads} median of slowest rank")
        print(f"{'op':<11}{'size':<6}{'dtype':<6}{'backend':<12}{'latency':>12}")
        for op, size, dt, label, us in rows:
            lat = f"{us:9.1f} us" if us < 1000 else f"{us / 1000:9.2f} ms"
            print(f"{op:<11}{size:<6}{dt:<6}{label:<12}{lat:>12}")


if __name__ == "__main__":
    main()
