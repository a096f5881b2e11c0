"""The in-process executor of ``llama-server``: the model and its KV pool in this process."""

from __future__ import annotations

import torch

from llama_mpi.models.deepseek_v2 import DeepseekV2
from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.mpi_server.engine.executor import ModelExecutor


class StepThreads:
    """llama.cpp's two thread counts: ``n_threads`` for decode steps, ``n_threads_batch`` for
    steps with prefill (-1: this process's count, resp. ``n_threads``). Every rank applies
    the same rule to the same batch."""

    def __init__(self, n_threads: int = -1, n_threads_batch: int = -1) -> None:
        self.decode = n_threads if n_threads > 0 else torch.get_num_threads()
        self.prefill = n_threads_batch if n_threads_batch > 0 else self.decode

    def apply(self, batch: ForwardBatch) -> None:
        want = self.prefill if batch.num_tokens > batch.num_seqs else self.decode
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)


class LocalExecutor(ModelExecutor):
    def __init__(self, model: DeepseekV2, num_blocks: int, block_size: int, max_model_len: int,
                 n_threads: int = -1, n_threads_batch: int = -1) -> None:
        self.model = model
        self.pool = model.make_kv_pool(num_blocks, block_size)
        self.vocab_size = model.cfg.vocab_size
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_model_len = max_model_len
        self.device = model.devices[0]
        self.threads = StepThreads(n_threads, n_threads_batch)

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        out = self.run(batch)
        assert out is not None  # logits=True: the model returns them
        return out

    def run(self, batch: ForwardBatch, logits: bool = True) -> torch.Tensor | None:
        """One step on this process's model and pool; the one way every rank runs a step
        (workers pass ``logits=False``: only rank 0 samples)."""
        self.threads.apply(batch)
        return self.model(batch, self.pool, logits=logits)
