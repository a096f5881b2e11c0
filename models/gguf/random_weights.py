"""Deterministic random DeepseekV2 weights under Hugging Face checkpoint names.

Every tensor is drawn from its own generator seeded by (seed, name), so tensors can be produced
lazily, one at a time and in any order, and the same seed always gives the same bytes.
Scales keep a forward pass well conditioned: linear weights ~ N(0, 1/fan_in), norms ~ 1, and a
router with enough spread that the chosen experts are not near ties.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

NORM_NOISE = 0.02  # norms are 1 + small noise, so norm weights still matter in parity tests
ROUTER_STD = 2.0  # router logit std for unit-RMS input; spreads top-k away from ties
BIAS_STD = 0.1  # e_score_correction_bias (V3-style selection bias)


@dataclass(frozen=True)
class WeightSpec:
    """Shape and init kind of one HF tensor."""

    shape: tuple[int, ...]
    kind: str  # "linear" | "embed" | "norm" | "router" | "bias"


def _linear(*shape: int) -> WeightSpec:
    return WeightSpec(tuple(shape), "linear")


def _norm(n: int) -> WeightSpec:
    return WeightSpec((n,), "norm")


def hf_weight_specs(config: Mapping[str, Any]) -> dict[str, WeightSpec]:
    """All HF checkpoint tensors of a DeepseekV2ForCausalLM, per-expert names, in model order."""
    e, heads, vocab = config["hidden_size"], config["num_attention_heads"], config["vocab_size"]
    dn, dr, dv = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    c, q = config["kv_lora_rank"], config.get("q_lora_rank")
    x, fe = config["n_routed_experts"], config["moe_intermediate_size"]
    shared = (config.get("n_shared_experts") or 0) * fe
    dense = config.get("first_k_dense_replace") or 0
    lin, norm = _linear, _norm
    specs = {"model.embed_tokens.weight": WeightSpec((vocab, e), "embed")}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        specs[f"{p}.input_layernorm.weight"] = norm(e)
        if q:
            specs[f"{a}.q_a_proj.weight"] = lin(q, e)
            specs[f"{a}.q_a_layernorm.weight"] = norm(q)
            specs[f"{a}.q_b_proj.weight"] = lin(heads * (dn + dr), q)
        else:
            specs[f"{a}.q_proj.weight"] = lin(heads * (dn + dr), e)
        specs[f"{a}.kv_a_proj_with_mqa.weight"] = lin(c + dr, e)
        specs[f"{a}.kv_a_layernorm.weight"] = norm(c)
        specs[f"{a}.kv_b_proj.weight"] = lin(heads * (dn + dv), c)
        specs[f"{a}.o_proj.weight"] = lin(e, heads * dv)
        specs[f"{p}.post_attention_layernorm.weight"] = norm(e)
        m = f"{p}.mlp"
        if i < dense:
            f = config["intermediate_size"]
            specs.update({f"{m}.gate_proj.weight": lin(f, e), f"{m}.up_proj.weight": lin(f, e),
                          f"{m}.down_proj.weight": lin(e, f)})
            continue
        specs[f"{m}.gate.weight"] = WeightSpec((x, e), "router")
        if config.get("topk_method") == "noaux_tc":
            specs[f"{m}.gate.e_score_correction_bias"] = WeightSpec((x,), "bias")
        for j in range(x):
            ex = f"{m}.experts.{j}"
            specs.update({f"{ex}.gate_proj.weight": lin(fe, e), f"{ex}.up_proj.weight": lin(fe, e),
                          f"{ex}.down_proj.weight": lin(e, fe)})
        if shared:
            sh = f"{m}.shared_experts"
            specs.update({f"{sh}.gate_proj.weight": lin(shared, e),
                          f"{sh}.up_proj.weight": lin(shared, e),
                          f"{sh}.down_proj.weight": lin(e, shared)})
    specs["model.norm.weight"] = norm(e)
    if not config.get("tie_word_embeddings"):
        specs["lm_head.weight"] = lin(vocab, e)
    return specs


def _generator(seed: int, name: str) -> torch.Generator:
    # hashlib, not hash(): Python's str hash is salted per process
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def random_tensor(spec: WeightSpec, seed: int, name: str) -> torch.Tensor:
    """One fp32 tensor, a pure function of (spec, seed, name)."""
    g = _generator(seed, name)
    x = torch.randn(spec.shape, generator=g, dtype=torch.float32)
    if spec.kind == "norm":
        return x.mul_(NORM_NOISE).add_(1.0)
    if spec.kind == "embed":
        return x  # unit-variance rows; the first RMSNorm rescales anyway
    if spec.kind == "bias":
        return x.mul_(BIAS_STD)
    std = (ROUTER_STD if spec.kind == "router" else 1.0) / spec.shape[-1] ** 0.5
    return x.mul_(std)


class RandomWeights(Mapping[str, torch.Tensor]):
    """Lazy read-only mapping HF name -> random tensor; each lookup generates afresh."""

    def __init__(self, config: Mapping[str, Any], seed: int = 0) -> None:
        self.specs = hf_weight_specs(config)
        self.seed = seed

    def __getitem__(self, name: str) -> torch.Tensor:
        return random_tensor(self.specs[name], self.seed, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def random_weights(config: Mapping[str, Any], seed: int = 0) -> RandomWeights:
    """Deterministic random weights for `config` (HF DeepseekV2Config field names)."""
    return RandomWeights(config, seed)
