"""Absorbed MLA attention for many query rows in one kernel call (``mla_attention.c``).

Each query row attends to its own sequence's context, read from the latent pool through the
sequence's slot list; rows of one sequence see the keys up to and including their own
position (causal). Used for decode rows and short prefill chunks in bf16 on CPUs where the
C kernels build; elsewhere the caller's per-sequence torch path runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_mpi.models.kernels.cpu_kernels import kernel, require_kernel


@dataclass
class RowContexts:
    """Which pool slots each query row attends to: ``slots[start[r] : start[r] + length[r]]``."""

    slots: torch.Tensor  # [sum of context lengths] int64, every sequence's slots in order
    start: torch.Tensor  # [R] int64
    length: torch.Tensor  # [R] int64


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype is torch.bfloat16 and device.type == "cpu" and kernel() is not None


def latent_attention(q: torch.Tensor, latent_pool: torch.Tensor, rows: RowContexts,
                     kv_lora_rank: int, scale: float) -> torch.Tensor:
    """``q`` [R, H, C + Rope] bf16 (k_b folded in, then the roped part); ``latent_pool``
    [S, C + Rope] bf16. Returns the attention-weighted latents ``[R, H, C]`` bf16."""
    R, H, D = q.shape
    q = q.contiguous()
    out = torch.empty(R, H, kv_lora_rank, dtype=torch.bfloat16)
    status = require_kernel().mla_attention_bf16(
        q.data_ptr(), latent_pool.data_ptr(), rows.slots.data_ptr(), rows.start.data_ptr(),
        rows.length.data_ptr(), out.data_ptr(), R, H, D, kv_lora_rank, scale,
        torch.get_num_threads())
    if status != 0:
        raise MemoryError("MLA attention kernel: no memory for its score buffers")
    return out
