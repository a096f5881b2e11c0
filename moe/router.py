"""The MoE gate: which experts each token goes to, and with what weight.

One router with switches covers the family: softmax (V2) or sigmoid (V3) scores; an optional
selection bias (V3's ``exp_probs_b``) that affects only which experts are chosen; optional
group limiting, ranking groups by their best expert (V2, transformers) or by the sum of their
best two (V3, llama.cpp); optional normalisation of the chosen weights; a scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_mpi.models.config import GATING_SIGMOID, ModelConfig


class Router:
    def __init__(self, cfg: ModelConfig, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight.float()  # [X, E]; routing is always computed in float32
        self.bias = None if bias is None else bias.float()
        self.top_k = cfg.num_experts_per_tok
        self.sigmoid = cfg.gating_func == GATING_SIGMOID
        self.groups, self.groups_used = cfg.num_expert_groups, cfg.num_expert_groups_used
        self.top2sum = cfg.group_scoring == "top2sum"
        self.normalize = cfg.expert_weights_norm
        scale = cfg.expert_weights_scale
        self.scale = scale if scale not in (0.0, 1.0) else None  # 0: key absent

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(weights [T, k] float32, expert ids [T, k] int64)``."""
        logits = F.linear(x.float(), self.weight)
        scores = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        select = scores if self.bias is None else scores + self.bias
        if self.groups > 1 and self.groups_used < self.groups:
            select = self._limit_groups(select)
        ids = torch.topk(select, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
        if self.scale is not None:
            weights = weights * self.scale
        return weights, ids

    def _limit_groups(self, select: torch.Tensor) -> torch.Tensor:
        T, X = select.shape
        grouped = select.view(T, self.groups, X // self.groups)
        if self.top2sum:
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_score = grouped.max(dim=-1).values
        keep = torch.topk(group_score, self.groups_used, dim=-1, sorted=False).indices
        mask = torch.ones(T, self.groups, dtype=torch.bool, device=select.device)
        mask.scatter_(1, keep, False)
        return grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view(T, X)
