"""The DeepSeek-V2 family's hyperparameters, read from GGUF ``deepseek2.*`` metadata.

Defaults for absent keys follow llama.cpp (see ../shared/reference/gguf_deepseek2.md §1):
gating absent means softmax, weights norm absent means no normalisation, scale absent or 0
means no scaling, group counts absent mean no group limit. Whether queries go through a
LoRA is decided by which tensors exist, never by the layer count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GATING_SOFTMAX = 1
GATING_SIGMOID = 2


class ConfigError(ValueError):
    """Metadata that cannot describe a model we can run; the message names file and key."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # dense FFN of the leading layers
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    first_dense_layers: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN (factor 1 or type none: plain RoPE)
    rope_scaling_type: str = "none"
    rope_factor: float = 1.0
    rope_original_context: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale_all_dim: float = 0.0  # = yarn_log_multiplier / 0.1
    max_position_embeddings: int = 4096
    # routing
    gating_func: int = GATING_SOFTMAX
    expert_weights_norm: bool = False
    expert_weights_scale: float = 1.0  # 0 or 1: no scaling
    num_expert_groups: int = 1
    num_expert_groups_used: int = 1
    group_scoring: str = "max"  # "max" (DeepSeek-V2, transformers) | "top2sum" (V3, llama.cpp)
    has_selection_bias: bool = False  # exp_probs_b (V3's e_score_correction_bias)
    # layout of the file
    legacy_kv_b: bool = False  # attn_kv_b instead of attn_k_b / attn_v_b
    tie_word_embeddings: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def uses_yarn(self) -> bool:
        return self.rope_scaling_type == "yarn" and self.rope_factor > 1.0

    @property
    def softmax_scale(self) -> float:
        """mscale² / sqrt(qk_head_dim), as llama.cpp and transformers (with #47435) compute it."""
        scale = self.qk_head_dim**-0.5
        if self.uses_yarn and self.rope_mscale_all_dim:
            m = 0.1 * self.rope_mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense_layers and self.num_experts > 0


def _get(md: dict[str, Any], key: str, default: Any = None, *, source: str) -> Any:
    full = f"deepseek2.{key}"
    if full in md:
        return md[full]
    if default is ConfigError:
        raise ConfigError(f"{source}: missing metadata key '{full}'")
    return default


def _typed(md: dict[str, Any], key: str, default: Any, kind: type, *, source: str) -> Any:
    """``_get`` then a type check, so a malformed value names the file and the key."""
    value = _get(md, key, default, source=source)
    if value is default and default is not ConfigError:
        return default
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok or (kind is float and not math.isfinite(value)):
        want = "an integer" if kind is int else "a finite number"
        raise ConfigError(f"{source}: metadata key 'deepseek2.{key}' must be {want}, got "
                          f"{value!r}")
    return kind(value)


def _int(md: dict[str, Any], key: str, default: Any = ConfigError, *, source: str) -> int:
    return _typed(md, key, default, int, source=source)


def _float(md: dict[str, Any], key: str, default: Any = ConfigError, *, source: str) -> float:
    return _typed(md, key, default, float, source=source)


def config_from_metadata(
    md: dict[str, Any], tensor_names: set[str], source: str, group_scoring: str = "auto"
) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata (key -> python value) and the tensor names."""
    arch = md.get("general.architecture")
    if arch != "deepseek2":
        raise ConfigError(
            f"{source}: architecture '{arch}' is not supported (general.architecture must be "
            "'deepseek2': DeepSeek-V2, V2-Lite, V2.5, V3)"
        )
    req = ConfigError
    n_head = _int(md, "attention.head_count", req, source=source)
    rope_dim = _int(md, "rope.dimension_count", req, source=source)
    kv_lora = _int(md, "attention.kv_lora_rank", req, source=source)
    if "deepseek2.attention.key_length_mla" in md:  # MLA-split file (llama.cpp >= #12801)
        qk_nope = _int(md, "attention.key_length_mla", source=source) - rope_dim
        v_dim = _int(md, "attention.value_length_mla", req, source=source)
    else:
        qk_nope = _int(md, "attention.key_length", req, source=source) - rope_dim
        v_dim = _int(md, "attention.value_length", req, source=source)
    legacy = "blk.0.attn_kv_b.weight" in tensor_names
    if not legacy and "blk.0.attn_k_b.weight" not in tensor_names:
        raise ConfigError(f"{source}: neither attn_kv_b nor attn_k_b/attn_v_b tensors in blk.0")
    q_lora = _int(md, "attention.q_lora_rank", 0, source=source)
    has_q_lora = "blk.0.attn_q_a.weight" in tensor_names
    if has_q_lora and q_lora <= 0:
        raise ConfigError(
            f"{source}: attn_q_a present but 'deepseek2.attention.q_lora_rank' absent"
        )
    gating = _int(md, "expert_gating_func", GATING_SOFTMAX, source=source) or GATING_SOFTMAX
    if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
        raise ConfigError(f"{source}: deepseek2.expert_gating_func = {gating} is not 1 or 2")
    if group_scoring == "auto":
        group_scoring = "top2sum" if gating == GATING_SIGMOID else "max"
    if group_scoring not in ("max", "top2sum"):
        raise ConfigError(f"moe_group_scoring must be auto, max or top2sum, not {group_scoring!r}")
    scaling_type = str(_get(md, "rope.scaling.type", "none", source=source))
    vocab = _int(md, "vocab_size", None, source=source)
    if vocab is None:
        vocab = len(md.get("tokenizer.ggml.tokens", [])) or None
    if vocab is None:
        raise ConfigError(f"{source}: no 'deepseek2.vocab_size' and no tokenizer.ggml.tokens")
    n_expert = _int(md, "expert_count", 0, source=source)
    cfg = ModelConfig(
        vocab_size=int(vocab),
        hidden_size=_int(md, "embedding_length", req, source=source),
        num_layers=_int(md, "block_count", req, source=source),
        num_heads=n_head,
        intermediate_size=_int(md, "feed_forward_length", 0, source=source),
        moe_intermediate_size=_int(md, "expert_feed_forward_length", 0, source=source),
        num_experts=n_expert,
        num_experts_per_tok=_int(md, "expert_used_count", 0, source=source),
        num_shared_experts=_int(md, "expert_shared_count", 0, source=source),
        first_dense_layers=_int(md, "leading_dense_block_count", 0, source=source),
        q_lora_rank=q_lora if has_q_lora else None,
        kv_lora_rank=kv_lora,
        qk_nope_head_dim=qk_nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=v_dim,
        rms_norm_eps=_float(md, "attention.layer_norm_rms_epsilon", 1e-6, source=source),
        rope_theta=_float(md, "rope.freq_base", 10000.0, source=source),
        rope_scaling_type=scaling_type,
        rope_factor=_float(md, "rope.scaling.factor", 1.0, source=source),
        rope_original_context=_int(
            md, "rope.scaling.original_context_length", 4096, source=source
        ),
        rope_beta_fast=_float(md, "rope.scaling.yarn_beta_fast", 32.0, source=source),
        rope_beta_slow=_float(md, "rope.scaling.yarn_beta_slow", 1.0, source=source),
        # the converter stores 0.1 * mscale_all_dim "for legacy reasons"
        rope_mscale_all_dim=_float(
            md, "rope.scaling.yarn_log_multiplier", 0.0, source=source
        ) / 0.1,
        max_position_embeddings=_int(md, "context_length", 4096, source=source),
        gating_func=gating,
        expert_weights_norm=bool(_get(md, "expert_weights_norm", False, source=source)),
        expert_weights_scale=_float(md, "expert_weights_scale", 0.0, source=source),
        num_expert_groups=_int(md, "expert_group_count", 1, source=source) or 1,
        num_expert_groups_used=_int(md, "expert_group_used_count", 1, source=source) or 1,
        group_scoring=group_scoring,
        has_selection_bias=f"blk.{_first_moe_layer(md)}.exp_probs_b.bias" in tensor_names,
        legacy_kv_b=legacy,
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    _check(cfg, source)
    return cfg


def _first_moe_layer(md: dict[str, Any]) -> int:
    return int(md.get("deepseek2.leading_dense_block_count", 0) or 0)  # checked in _int


def _check(cfg: ModelConfig, source: str) -> None:
    if cfg.num_experts and not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
        raise ConfigError(
            f"{source}: deepseek2.expert_used_count = {cfg.num_experts_per_tok} must be in "
            f"1..{cfg.num_experts}"
        )
    if cfg.num_expert_groups > 1:
        if cfg.num_experts % cfg.num_expert_groups:
            raise ConfigError(
                f"{source}: deepseek2.expert_group_count = {cfg.num_expert_groups} does not "
                f"divide expert_count = {cfg.num_experts}"
            )
        if not 0 < cfg.num_expert_groups_used <= cfg.num_expert_groups:
            raise ConfigError(f"{source}: deepseek2.expert_group_used_count is out of range")
    if cfg.qk_nope_head_dim <= 0 or cfg.v_head_dim <= 0 or cfg.qk_rope_head_dim % 2:
        raise ConfigError(f"{source}: inconsistent attention head dimensions in metadata")
