"""Reference models for parity tests: transformers' DeepseekV2 with random weights, and the
inverse of the GGUF conversion done with gguf-py (not our reader), so quantized files can be
compared against transformers running on exactly the dequantized weights."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

BASE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
    n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=32,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=5120,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                  "mscale_all_dim": 0.707, "original_max_position_embeddings": 128,
                  "beta_fast": 32, "beta_slow": 1},
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
VARIANTS = {
    # DeepSeek-V2-Lite shape: no q LoRA, greedy softmax routing, no scaling, YaRN
    "lite": dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                 routed_scaling_factor=1.0),
    # DeepSeek-V2 shape: q LoRA, group-limited routing (max per group), scale != 1
    "full": dict(q_lora_rank=48, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                 routed_scaling_factor=2.0),
    # rows of 256 so that K-quants apply; like V2-Lite, the routed experts' down projection
    # (384 = 1.5 x 256) falls back to 32-element types while the shared experts' (768) does
    # not, and a TP split of 768 or of the attention output (8 heads x 64) may cut a block
    "quant": dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                  routed_scaling_factor=1.0, hidden_size=256, intermediate_size=1024,
                  moe_intermediate_size=384, num_attention_heads=8, num_key_value_heads=8,
                  kv_lora_rank=256, v_head_dim=64),
}


def hf_model(variant: str, seed: int = 0) -> DeepseekV2ForCausalLM:
    cfg = DeepseekV2Config(**{**BASE, **VARIANTS[variant]})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.05)
            else:  # a wide router spread keeps top-k choices away from near-ties
                p.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else 0.08)
    return model


def hf_logits(model: DeepseekV2ForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def load_dequantized(model: DeepseekV2ForCausalLM, path: Path) -> None:
    """Overwrite ``model``'s weights with the GGUF's, dequantized by gguf-py."""
    reader = gguf.GGUFReader(path)
    t = {x.name: torch.from_numpy(np.array(gguf.quants.dequantize(x.data, x.tensor_type)))
         for x in reader.tensors}
    cfg = model.config
    H, Dn, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": t["token_embd.weight"],
        "model.norm.weight": t["output_norm.weight"],
        "lm_head.weight": t["output.weight"],
    }
    attn_names = {"attn_q": "q_proj", "attn_q_a": "q_a_proj", "attn_q_a_norm": "q_a_layernorm",
                  "attn_q_b": "q_b_proj", "attn_kv_a_mqa": "kv_a_proj_with_mqa",
                  "attn_kv_a_norm": "kv_a_layernorm", "attn_output": "o_proj",
                  "attn_kv_b": "kv_b_proj"}
    for i in range(cfg.num_hidden_layers):
        b, a = f"blk.{i}.", f"model.layers.{i}."
        sd[a + "input_layernorm.weight"] = t[b + "attn_norm.weight"]
        sd[a + "post_attention_layernorm.weight"] = t[b + "ffn_norm.weight"]
        for g, h in attn_names.items():
            if b + g + ".weight" in t:
                sd[f"{a}self_attn.{h}.weight"] = t[b + g + ".weight"]
        if b + "attn_k_b.weight" in t:
            k_b, v_b = t[b + "attn_k_b.weight"], t[b + "attn_v_b.weight"]  # [H,C,Dn], [H,Dv,C]
            kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [H, Dn+Dv, C]
            sd[a + "self_attn.kv_b_proj.weight"] = kv_b.reshape(H * (Dn + Dv), -1)
        if i < cfg.first_k_dense_replace:
            for p in ("gate", "up", "down"):
                sd[f"{a}mlp.{p}_proj.weight"] = t[f"{b}ffn_{p}.weight"]
            continue
        sd[a + "mlp.gate.weight"] = t[b + "ffn_gate_inp.weight"]
        sd[a + "mlp.experts.gate_up_proj"] = torch.cat(
            [t[b + "ffn_gate_exps.weight"], t[b + "ffn_up_exps.weight"]], dim=1)
        sd[a + "mlp.experts.down_proj"] = t[b + "ffn_down_exps.weight"]
        for p in ("gate", "up", "down"):
            sd[f"{a}mlp.shared_experts.{p}_proj.weight"] = t[f"{b}ffn_{p}_shexp.weight"]
    model.load_state_dict(sd, strict=True)
