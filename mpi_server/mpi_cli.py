"""``mpirun -np N llama-mpi-server --config ep.yaml``: EP + TP over MPI ranks.

Every rank parses the same configuration and loads only its shard of the GGUF. Rank 0 runs
the HTTP server, the scheduler and sampling; the others follow its steps. SIGTERM to rank 0
(or to mpirun) shuts every rank down; any failure aborts the whole job.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # before torch: see parallel/


def main(argv: list[str] | None = None) -> int:
    from llama_mpi.mpi_server.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(None, list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"llama-mpi-server: {exc}", file=sys.stderr)
        return 2
    from llama_mpi.mpi_server.engine_factory import build_engine, build_tokenizer, pool_geometry
    from llama_mpi.mpi_server.rank_runtime import DrivingExecutor, load_shard, run_worker
    from llama_mpi.parallel.bootstrap import init_parallel
    from llama_mpi.parallel.guard import run_guarded
    from llama_mpi.parallel.step_channel import StepChannel

    ctx = init_parallel(config.device, n_threads=config.n_threads if config.n_threads > 0
                        else None, backend=config.comm_backend,
                        timeout=config.collective_timeout)
    channel = StepChannel(ctx.comm)

    def prepare():
        model = run_guarded(load_shard, config, ctx)
        geometry = pool_geometry(config, model.cfg.max_position_embeddings)
        return model, geometry

    if ctx.rank != 0:
        model, (blocks, block, _) = prepare()
        run_guarded(run_worker, model, blocks, block, channel)
        return 0

    from llama_mpi.mpi_server.cli import serve

    def build(cfg):
        build_tokenizer(cfg)  # fail fast on a bad vocabulary before the ranks load
        model, (blocks, block, max_len) = prepare()
        executor = DrivingExecutor(model, channel, ctx, num_blocks=blocks, block_size=block,
                                   max_model_len=max_len, n_threads=ctx.n_threads,
                                   n_threads_batch=config.n_threads_batch)
        return build_engine(cfg, executor)

    code = serve(config, build)
    return code


if __name__ == "__main__":
    sys.exit(main())
