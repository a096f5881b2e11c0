"""``llama-mpi-server`` whose rank ``FAIL_RANK`` raises at its ``FAIL_AT``-th step: run as
``mpirun -np 2 python -m tests.mpi_server.faulty_server FAIL_RANK FAIL_AT <server args>``.

The fault goes in through ``mpi_cli.main``'s test hook, not the production loop."""

from __future__ import annotations

import sys

from llama_mpi.mpi_server import mpi_cli


def main() -> int:
    fail_rank, fail_at, *args = sys.argv[1:]

    def hook(rank: int, step: int) -> None:
        if rank == int(fail_rank) and step == int(fail_at):
            raise RuntimeError(f"injected failure at step {step}")

    return mpi_cli.main(args, worker_hook=hook)


if __name__ == "__main__":
    sys.exit(main())
