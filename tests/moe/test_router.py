"""The router against transformers' gates: DeepSeek-V2 (softmax, greedy or group-limited by
each group's best expert) and DeepSeek-V3 (sigmoid, selection bias, groups ranked by their
top-two sum, normalised and scaled weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from llama_mpi.models.config import GATING_SIGMOID, GATING_SOFTMAX, ModelConfig
from llama_mpi.moe.router import Router

X, E, K = 32, 48, 6


def model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=10, hidden_size=E, num_layers=1, num_heads=1, intermediate_size=8,
                moe_intermediate_size=8, num_experts=X, num_experts_per_tok=K,
                num_shared_experts=1, first_dense_layers=0, q_lora_rank=None,
                kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    return ModelConfig(**{**base, **kw})


def same_routing(ours: tuple, theirs_w: torch.Tensor, theirs_ids: torch.Tensor) -> None:
    w, ids = ours
    o1, o2 = ids.sort(-1), theirs_ids.sort(-1)
    assert torch.equal(o1.values, o2.values)
    torch.testing.assert_close(w.gather(1, o1.indices), theirs_w.gather(1, o2.indices))


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_router_matches_transformers(method):
    groups = 4 if method == "group_limited_greedy" else 1
    hf_cfg = DeepseekV2Config(hidden_size=E, num_attention_heads=4, n_routed_experts=X,
                              num_experts_per_tok=K,
                              topk_method=method, n_group=groups, topk_group=2 if groups > 1
                              else 1, routed_scaling_factor=2.5)
    hf = DeepseekV2TopkRouter(hf_cfg)
    torch.manual_seed(0)
    hf.weight.data.normal_(0, 0.5)
    ours = Router(model_config(gating_func=GATING_SOFTMAX, num_expert_groups=groups,
                               num_expert_groups_used=2 if groups > 1 else 1,
                               group_scoring="max", expert_weights_scale=2.5),
                  hf.weight.data.clone(), None)
    x = torch.randn(40, E)
    _, w, ids = hf(x)
    same_routing(ours(x), w, ids)


def test_v3_router_matches_transformers():
    hf_cfg = DeepseekV3Config(hidden_size=E, num_attention_heads=4, n_routed_experts=X,
                              num_experts_per_tok=K,
                              n_group=8, topk_group=3, norm_topk_prob=True,
                              routed_scaling_factor=2.5)
    hf = DeepseekV3TopkRouter(hf_cfg)
    torch.manual_seed(1)
    hf.weight.data.normal_(0, 0.5)
    hf.e_score_correction_bias.normal_(0, 0.3)
    ours = Router(model_config(gating_func=GATING_SIGMOID, num_expert_groups=8,
                               num_expert_groups_used=3, group_scoring="top2sum",
                               expert_weights_norm=True, expert_weights_scale=2.5,
                               has_selection_bias=True),
                  hf.weight.data.clone(), hf.e_score_correction_bias.clone())
    x = torch.randn(40, E)
    out = hf(x)
    w, ids = out[-2], out[-1]
    same_routing(ours(x), w, ids)
