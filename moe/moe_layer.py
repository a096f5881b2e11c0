"""A DeepSeek MoE block: router, routed experts (via a dispatcher) and shared experts."""

from __future__ import annotations

import torch

from llama_mpi.models.config import ModelConfig
from llama_mpi.models.gguf.gguf_file import GGUFFile
from llama_mpi.models.layers import SwiGLU
from llama_mpi.models.shard import Shard
from llama_mpi.models.weight_loader import WeightPolicy
from llama_mpi.moe.dispatcher import Dispatcher
from llama_mpi.moe.experts import Experts, make_experts
from llama_mpi.moe.router import Router


class MoE:
    def __init__(self, router: Router, experts: Experts, shared: SwiGLU | None,
                 dispatcher: Dispatcher) -> None:
        self.router, self.experts, self.shared = router, experts, shared
        self.dispatcher = dispatcher

    @classmethod
    def from_gguf(cls, gf: GGUFFile, cfg: ModelConfig, layer: int, shard: Shard,
                  dispatcher: Dispatcher, fused: bool, policy: WeightPolicy) -> MoE:
        p, E, X = f"blk.{layer}.", cfg.hidden_size, cfg.num_experts
        gate = gf.load(p + "ffn_gate_inp.weight", torch.float32, expect=(X, E))
        bias = None
        if cfg.has_selection_bias:
            bias = gf.load(p + "exp_probs_b.bias", torch.float32, expect=(X,))
        experts = make_experts(fused).from_gguf(
            gf, layer, shard.experts(X), X, E, cfg.moe_intermediate_size, policy)
        shared = None
        if cfg.num_shared_experts:
            width = cfg.moe_intermediate_size * cfg.num_shared_experts
            shared = SwiGLU.from_gguf(
                gf, p + "ffn", "_shexp", E, width,
                lambda align: shard.columns(width, "shared-expert columns", align), policy)
        return cls(Router(cfg, gate, bias), experts, shared, dispatcher)

    def num_params(self) -> tuple[int, int]:
        """(routed-expert parameters here, everything else here)."""
        other = self.router.weight.numel() + (self.shared.num_params() if self.shared else 0)
        return self.experts.num_params(), other

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (routed sum, shared-expert partial sum or None).

        The routed sum is complete if ``dispatcher.complete``; the shared part is a TP
        partial sum. The caller adds them and all-reduces what needs it once.
        """
        weights, ids = self.router(x)
        routed = self.dispatcher(x, ids, weights, self.experts)
        return routed, (self.shared(x) if self.shared is not None else None)
