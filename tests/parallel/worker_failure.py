"""mpirun worker: rank 1 misbehaves inside a collective loop; the job must not hang.

usage: worker_failure.py raise|stall <backend> <timeout_s>
  raise: rank 1 raises at iteration 3 (run_guarded must abort the job).
  stall: rank 1 sleeps forever instead of joining (the watchdog must abort the job).
"""

from __future__ import annotations

import sys
import time

import torch

from llama_mpi.parallel.bootstrap import init_parallel
from llama_mpi.parallel.guard import run_guarded


def main(mode: str, backend: str, timeout: float) -> None:
    ctx = init_parallel(device="cpu", backend=backend, timeout=timeout)
    t = torch.ones(16)
    for step in range(1000):
        if ctx.rank == 1 and step == 3:
            if mode == "raise":
                raise ValueError("injected failure on rank 1")
            while True:
                time.sleep(3600)
        ctx.comm.all_reduce(t)
        t.fill_(1.0)
    print(f"rank {ctx.rank}: loop finished, which should not happen", flush=True)


if __name__ == "__main__":
    run_guarded(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))
