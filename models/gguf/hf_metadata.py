"""The GGUF metadata of a converted DeepseekV2: the keys (and value types) llama.cpp's
converter writes, and the tokenizer fields."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import gguf
import numpy as np

FT = gguf.LlamaFileType
HFConfig = Mapping[str, Any]  # config.json: JSON values, read by key


def rope_params(config: HFConfig) -> dict:
    """Rope settings live in `rope_scaling` (config.json, transformers 4.x) or `rope_parameters`."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    return params


def write_metadata(w: gguf.GGUFWriter, cfg: HFConfig, layout: str, ftype: FT, name: str) -> None:
    """The keys (and value types) llama.cpp's converter writes; `layout` picks old vs new MLA."""
    mla = layout == "mla"
    heads, kv_lora = cfg["num_attention_heads"], cfg["kv_lora_rank"]
    rope_dim = cfg["qk_rope_head_dim"]
    rope = rope_params(cfg)
    w.add_type("model")
    w.add_name(name)
    # generic TextModel.set_gguf_parameters
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(1 if mla else heads)  # the new converter forces MQA with one latent head
    rope_type = rope.get("rope_type") or rope.get("type")
    if rope_type == "yarn" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
    theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps") or 1e-6))
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])
    # absent scoring_func means softmax (V2 configs); written always, as mid-2025 converters did
    sigmoid = (cfg.get("scoring_func") or "softmax") == "sigmoid"
    gating = gguf.ExpertGatingFuncType
    w.add_expert_gating_func(gating.SIGMOID if sigmoid else gating.SOFTMAX)
    w.add_file_type(ftype)
    # DeepseekV2Model.set_gguf_parameters
    w.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("q_lora_rank"):
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(kv_lora)
    if mla:
        w.add_key_length(kv_lora + rope_dim)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope_dim)
        w.add_value_length_mla(cfg["v_head_dim"])
    else:
        w.add_key_length(cfg["qk_nope_head_dim"] + rope_dim)
        w.add_value_length(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
    w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor") or 1.0))
    w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob")))
    w.add_rope_dimension_count(rope_dim)
    if rope.get("mscale_all_dim") is not None:
        # stored as 0.1 * mscale_all_dim "for legacy reasons" (llama.cpp #17945)
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_vocab(w: gguf.GGUFWriter, vocab: Mapping[str, object]) -> None:
    """Write `tokenizer.*` fields keyed by GGUF name; ids are u32 and int arrays i32 as upstream."""
    for key, val in vocab.items():
        if isinstance(val, np.ndarray):
            val = val.tolist()
        if isinstance(val, bool):
            w.add_bool(key, val)
        elif isinstance(val, int):
            w.add_uint32(key, val)
        elif isinstance(val, float):
            w.add_float32(key, val)
        elif isinstance(val, str):
            w.add_string(key, val)
        elif isinstance(val, Iterable):
            w.add_array(key, list(val))
        else:
            raise TypeError(f"{key}: cannot write a {type(val).__name__} to GGUF")
