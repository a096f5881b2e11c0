"""``llama-mpi-server``'s ranks: each loads its shard; rank 0 serves HTTP and drives steps.

Rank 0 publishes every step's batch before running it, the others run the same batch in
lockstep, so every collective inside the model is entered by all ranks in the same order.
A failure anywhere aborts the whole job (MPI Abort) with the failing rank's message.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

import torch

from llama_mpi.models.deepseek_v2 import DeepseekV2
from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.models.loader import load_model
from llama_mpi.models.shard import Shard
from llama_mpi.models.tensor_walk import check_finite
from llama_mpi.moe.ep_dispatchers import make_dispatcher
from llama_mpi.mpi_server.config import ServerConfig
from llama_mpi.mpi_server.engine.local_executor import LocalExecutor
from llama_mpi.mpi_server.settings import model_options
from llama_mpi.parallel.bootstrap import ParallelContext
from llama_mpi.parallel.heartbeat import Heartbeat
from llama_mpi.parallel.step_channel import StepChannel

log = logging.getLogger(__name__)


def load_shard(config: ServerConfig, ctx: ParallelContext) -> DeepseekV2:
    """This rank's heads (TP) and experts (EP); a rank count that does not divide them is
    refused with the valid counts."""
    from llama_mpi.models.loader import open_model_file

    _, cfg = open_model_file(config.model, config.moe_group_scoring)
    n, r = ctx.world_size, ctx.rank
    shard = Shard(tp_rank=r, tp_size=n, ep_rank=r, ep_size=n)
    shard.heads(cfg.num_heads), shard.experts(cfg.num_experts)  # validate before loading
    vocab_parallel = config.vocab_parallel and n > 1
    if vocab_parallel and cfg.vocab_size % n:
        log.warning("vocab_parallel: %d ranks do not divide the vocabulary of %d; the LM head "
                    "is replicated instead", n, cfg.vocab_size)
        vocab_parallel = False
    from llama_mpi.mpi_server.engine_factory import check_memory, log_resident

    check_memory(config, ctx.device, n, n, vocab_parallel, ctx.local_size)
    model = load_model(config.model, **model_options(
        config, shard=shard, all_reduce=ctx.comm.all_reduce, device=ctx.device,
        dispatcher=make_dispatcher(config.moe_comm, ctx.comm, cfg.num_experts),
        vocab_comm=ctx.comm if vocab_parallel else None))
    if config.check_tensors:  # this rank's shard: every rank checks what it holds
        check_finite(model)
    counts = model.param_counts()
    log.info("rank %d/%d holds %s parameters", r, n, counts)
    log_resident(model)
    return model


class DrivingExecutor(LocalExecutor):
    """Rank 0's executor: publish the step, then run this rank's part of it."""

    def __init__(self, model: DeepseekV2, channel: StepChannel, ctx: ParallelContext,
                 heartbeat: Heartbeat | None = None, **kwargs: int) -> None:
        super().__init__(model, **kwargs)
        self.channel, self.ctx, self._closed = channel, ctx, False
        self.heartbeat = heartbeat

    def health(self) -> str | None:
        return None if self.heartbeat is None else self.heartbeat.health()

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        try:
            self.channel.publish(batch)
            return super().execute(batch)
        except BaseException:  # other ranks are mid-step: end the whole job, loudly
            self.ctx.comm.abort(f"failed during a step:\n{traceback.format_exc()}")
            raise

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            if self.heartbeat is not None:  # the workers leave now: no alarm for that
                self.heartbeat.close()
            self.channel.publish(None)


def run_worker(executor: LocalExecutor, channel: StepChannel,
               on_step: Callable[[int], None] | None = None) -> None:
    """Ranks > 0: run published steps until the shutdown message, through the same
    ``LocalExecutor.run`` as rank 0 (same thread counts per step, no logits).

    ``on_step(n)`` runs before this rank's n-th step: a test hook (e.g. to make a rank fail
    mid-decode and check that the whole job ends with its message)."""
    step = 0
    while (batch := channel.receive()) is not None:
        step += 1
        if on_step is not None:
            on_step(step)
        executor.run(batch, logits=False)
