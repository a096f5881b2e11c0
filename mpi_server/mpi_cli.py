"""``mpirun -np N llama-mpi-server --config ep.yaml``: EP + TP over MPI ranks.

Every rank parses the same configuration and loads only its shard of the GGUF. Rank 0 runs
the HTTP server, the scheduler and sampling; the others follow its steps. SIGTERM to rank 0
(or to mpirun) shuts every rank down; any failure aborts the whole job.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # before torch: see parallel/


def main(argv: list[str] | None = None, worker_hook: Callable[[int, int], None] | None = None
         ) -> int:
    """``worker_hook(rank, step)``, for tests, runs on worker ranks before each step."""
    from llama_mpi.mpi_server.cli import configure

    config = configure("llama-mpi-server", argv)
    if config is None:
        return 2
    from llama_mpi.mpi_server.engine.local_executor import LocalExecutor
    from llama_mpi.mpi_server.engine_factory import build_engine, build_tokenizer, pool_geometry
    from llama_mpi.mpi_server.rank_runtime import DrivingExecutor, load_shard, run_worker
    from llama_mpi.parallel.bootstrap import init_parallel
    from llama_mpi.parallel.guard import run_guarded
    from llama_mpi.parallel.heartbeat import Heartbeat
    from llama_mpi.parallel.startup import StartupError, run_agreed
    from llama_mpi.parallel.step_channel import StepChannel

    ctx = init_parallel(config.device, n_threads=config.n_threads if config.n_threads > 0
                        else None, backend=config.comm_backend,
                        timeout=config.collective_timeout)
    channel = StepChannel(ctx.comm)
    heartbeat = None
    if ctx.world_size > 1:
        from mpi4py import MPI

        heartbeat = Heartbeat.start(MPI.COMM_WORLD, timeout=config.heartbeat_timeout)

    def prepare():
        def work():
            # rank 0's tokenizer first: a bad vocabulary or chat template fails before loading
            tokenizer = build_tokenizer(config) if ctx.rank == 0 else None
            model = load_shard(config, ctx)
            return model, pool_geometry(config, model.cfg.max_position_embeddings), tokenizer

        if ctx.world_size == 1:
            return work()
        from mpi4py import MPI

        return run_agreed(MPI.COMM_WORLD, work, verbose=config.verbose)

    if ctx.rank != 0:
        # mpirun forwards SIGTERM/SIGINT to every rank; workers leave on rank 0's shutdown
        # message instead, so that rank 0 can finish the step in flight first
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            model, (blocks, block, max_len), _ = prepare()
        except StartupError:  # rank 0 prints the job's message
            return 1
        hook = None if worker_hook is None else functools.partial(worker_hook, ctx.rank)
        executor = LocalExecutor(model, blocks, block, max_len, ctx.n_threads,
                                 config.n_threads_batch)
        run_guarded(run_worker, executor, channel, hook)
        if heartbeat is not None:
            heartbeat.close()
        return 0

    from llama_mpi.mpi_server.cli import serve
    from llama_mpi.parallel.abort import abort_job

    executors: list[DrivingExecutor] = []
    agreed_failure = False

    def build(cfg):
        nonlocal agreed_failure
        try:
            model, (blocks, block, max_len), tokenizer = prepare()
        except StartupError:
            agreed_failure = True  # every rank knows and leaves by itself
            raise
        executor = DrivingExecutor(model, channel, ctx, num_blocks=blocks, block_size=block,
                                   max_model_len=max_len, n_threads=ctx.n_threads,
                                   n_threads_batch=config.n_threads_batch, heartbeat=heartbeat)
        executors.append(executor)
        return build_engine(cfg, executor, tokenizer)

    code = serve(config, build)
    if agreed_failure:
        return code or 1
    if code != 0 or not executors:  # the other ranks may be loading or waiting: end them
        abort_job(f"rank 0: llama-mpi-server failed (exit {code}); aborting the job", code or 1)
    executors[0].shutdown()  # idempotent; the engine normally did it already
    return 0


if __name__ == "__main__":
    sys.exit(main())
