"""The in-process executor of ``llama-server``: the model and its KV pool in this process."""

from __future__ import annotations

import torch

from llama_mpi.models.deepseek_v2 import DeepseekV2
from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.mpi_server.engine.executor import ModelExecutor


class LocalExecutor(ModelExecutor):
    def __init__(self, model: DeepseekV2, num_blocks: int, block_size: int, max_model_len: int,
                 n_threads: int = -1, n_threads_batch: int = -1) -> None:
        self.model = model
        self.pool = model.make_kv_pool(num_blocks, block_size)
        self.vocab_size = model.cfg.vocab_size
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_model_len = max_model_len
        self.device = model.devices[0]
        # llama.cpp's two thread counts: one for decode steps, one for steps with prefill
        default = torch.get_num_threads()
        self._threads = n_threads if n_threads > 0 else default
        self._threads_batch = n_threads_batch if n_threads_batch > 0 else self._threads

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        prefill = batch.num_tokens > batch.num_seqs
        want = self._threads_batch if prefill else self._threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
        return self.model(batch, self.pool)
