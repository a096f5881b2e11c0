"""The paged MLA latent cache: one pool of fixed-size blocks shared by all sequences.

Per token and layer MLA caches only the normalised compressed KV (``kv_lora_rank`` values)
and the roped shared key (``qk_rope_head_dim`` values): 576 numbers for DeepSeek-V2, not
2 x heads x head_dim. Sequences address the pool through block tables (``ForwardBatch``).
"""

from __future__ import annotations

import torch


class LatentKVPool:
    """Storage only: per layer ``[num_blocks * block_size, kv_lora_rank + rope_dim]``, each
    layer's tensor on that layer's device (layer split puts layers on several devices)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | list[torch.device] = "cpu",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("the KV pool needs at least one block of at least one token")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        devices = device if isinstance(device, list) else [torch.device(device)] * num_layers
        width = kv_lora_rank + rope_dim
        self.data = [
            torch.zeros(num_blocks * block_size, width, dtype=dtype, device=d) for d in devices
        ]

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        """Store ``latent`` ([T, C + R]) at ``slots`` ([T]) of ``layer``."""
        dst = self.data[layer]
        dst.index_copy_(0, slots.to(dst.device), latent.to(dst.dtype))

    def layer(self, layer: int) -> torch.Tensor:
        return self.data[layer]
