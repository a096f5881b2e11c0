"""The one narrow call between the engine and whatever runs the model.

The single-process server runs the model in-process; ``llama-mpi-server`` puts an executor
on rank 0 that broadcasts the batch to every rank before running its own shard. The engine
sees only this interface, so it knows nothing of tensor layouts or rank layouts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from llama_mpi.models.forward_batch import ForwardBatch


class ModelExecutor(ABC):
    """Runs one forward step and returns float32 logits for ``batch.logits_indices``."""

    vocab_size: int
    num_blocks: int  # blocks in the KV pool
    block_size: int  # tokens per block
    max_model_len: int  # longest context the model may see
    device: torch.device

    @abstractmethod
    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits ``[len(batch.logits_indices), vocab_size]`` on ``self.device``."""

    def health(self) -> str | None:
        """None if every rank behind this executor is alive, else why not (e.g. a silent
        rank); the engine's ``health`` reports it."""
        return None

    def shutdown(self) -> None:
        """Release ranks / devices. Idempotent."""
        return None
