"""mpirun worker: print what init_parallel chose on this rank, one JSON line per rank."""

from __future__ import annotations

import json
import sys

import torch

from llama_mpi.parallel.bootstrap import available_cores, init_parallel
from llama_mpi.parallel.guard import run_guarded


def main() -> None:
    ctx = init_parallel(backend="mpi", timeout=30.0)
    info = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "local_rank": ctx.local_rank,
        "local_size": ctx.local_size,
        "device": str(ctx.device),
        "n_threads": ctx.n_threads,
        "torch_threads": torch.get_num_threads(),
        "cores": available_cores(),
        "comm": type(ctx.comm).__name__,
    }
    sys.stdout.write("BOOT " + json.dumps(info) + "\n")
    sys.stdout.flush()
    ctx.comm.barrier()


if __name__ == "__main__":
    run_guarded(main)
