"""Build deterministic random DeepSeek-V2 GGUF test models (`llama-mpi-build-model`).

Presets: `tiny` (the quick start's built-in model), `lite` / `full` (small V2-Lite- and
V2-shaped models for tests), `v2-lite` (V2-Lite's real dims) and `bench4` (V2-Lite dims,
4 layers, 102400 vocab). Small dims are multiples of 32 so every 32-block type applies; K-quant
ftypes (q4_k_m, q5_k_m, q6_k) pick per-tensor types as llama-quantize does (`quant_plan`), so
rows that are not multiples of 256 (all of `lite`/`full`, some of `tiny`) take its fallbacks.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

from .builtin_vocab import builtin_vocab, vocab_from_gguf
from .hf_to_gguf import FTYPES, LAYOUTS, convert
from .random_weights import random_weights

YARN_V2 = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
           "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
# DeepSeek-V2-Lite config.json (reference doc section 1)
V2_LITE: dict[str, Any] = {
    "hidden_size": 2048, "num_hidden_layers": 27, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_attention_heads": 16, "num_key_value_heads": 16,
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
    "first_k_dense_replace": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
    "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax",
    "rope_theta": 10000.0, "rope_scaling": YARN_V2, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840, "vocab_size": 102400, "tie_word_embeddings": False,
}
# Small YaRN: factor 4 over 1024 keeps the built-in model's context (4096) cheap to cache.
YARN_SMALL = {**YARN_V2, "factor": 4.0, "original_max_position_embeddings": 1024}
_SMALL = {"max_position_embeddings": 4096, "rope_scaling": YARN_SMALL, "qk_rope_head_dim": 16,
          "qk_nope_head_dim": 32, "v_head_dim": 32, "kv_lora_rank": 64}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {**V2_LITE, **_SMALL, "hidden_size": 256, "num_hidden_layers": 4,
             "intermediate_size": 512, "moe_intermediate_size": 128, "num_attention_heads": 8,
             "num_key_value_heads": 8, "n_routed_experts": 16, "num_experts_per_tok": 4,
             "vocab_size": 1024},
    "lite": {**V2_LITE, **_SMALL, "hidden_size": 128, "num_hidden_layers": 3,
             "intermediate_size": 256, "moe_intermediate_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2,
             "vocab_size": 512},
    "full": {**V2_LITE, **_SMALL, "hidden_size": 128, "num_hidden_layers": 3,
             "intermediate_size": 256, "moe_intermediate_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 4, "q_lora_rank": 96, "n_routed_experts": 16,
             "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
             "topk_method": "group_limited_greedy", "routed_scaling_factor": 2.0,
             "vocab_size": 512},
    "v2-lite": dict(V2_LITE),
    "bench4": {**V2_LITE, "num_hidden_layers": 4},
}
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama-mpi"


def preset_config(name: str = "tiny", **overrides: object) -> dict[str, Any]:
    """HF DeepseekV2Config-style dict for a preset, with field overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown config fields: {sorted(unknown)}")
    cfg.update(copy.deepcopy(overrides))
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]  # HF MLA: one kv head per q head
    return cfg


def default_model_path(preset: str = "tiny", ftype: str = "bf16", layout: str = "mla",
                       seed: int = 0) -> Path:
    """Cache path; the default build is `~/.cache/llama-mpi/tiny-deepseek2.gguf`."""
    if (ftype, layout, seed) == ("bf16", "mla", 0):
        return CACHE_DIR / f"{preset}-deepseek2.gguf"
    return CACHE_DIR / f"{preset}-deepseek2-{ftype}-{layout}-s{seed}.gguf"


def build_model(out_path: str | os.PathLike | None = None, *, preset: str = "tiny",
                ftype: str = "bf16", layout: str = "mla", seed: int = 0,
                vocab_gguf: str | os.PathLike | None = None, **overrides: object) -> Path:
    """Write a random-weight `deepseek2` GGUF for `preset` and return its path.

    With `vocab_gguf`, its tokenizer (e.g. the real 102400-token DeepSeek vocab) replaces the
    built-in one and sets `vocab_size`.
    """
    cfg = preset_config(preset, **overrides)
    if vocab_gguf is not None:
        vocab = vocab_from_gguf(vocab_gguf)
        n_tokens = len(vocab["tokenizer.ggml.tokens"])
        if "vocab_size" in overrides and overrides["vocab_size"] != n_tokens:
            raise ValueError(f"vocab_size {overrides['vocab_size']} != {n_tokens} tokens")
        cfg["vocab_size"] = n_tokens
    else:
        vocab = builtin_vocab(cfg["vocab_size"])
    if out_path is None:
        out_path = default_model_path(preset, ftype, layout, seed)
    name = f"DeepSeek-V2 {preset} (random weights, seed {seed})"
    return convert(random_weights(cfg, seed), cfg, out_path, ftype=ftype, layout=layout,
                   vocab=vocab, name=name)


def ensure_model(path: str | os.PathLike | None = None, preset: str = "tiny") -> Path:
    """The built-in model: build it once into the cache, reuse it afterwards."""
    path = Path(path) if path is not None else default_model_path(preset)
    return path if path.is_file() else build_model(path, preset=preset)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llama-mpi-build-model", description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", type=Path, help="output GGUF (default: under ~/.cache)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--ftype", default="bf16", choices=list(FTYPES),
                    help="file type; quantized ones mix tensor types as llama-quantize does")
    ap.add_argument("--layout", default="mla", choices=list(LAYOUTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-gguf", type=Path, help="copy the tokenizer from this GGUF")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers")
    args = ap.parse_args(argv)
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    path = build_model(args.output, preset=args.preset, ftype=args.ftype, layout=args.layout,
                       seed=args.seed, vocab_gguf=args.vocab_gguf, **overrides)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
