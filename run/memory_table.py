#!/usr/bin/env python3
"""Memory per rank for DeepSeek-V2-Lite and DeepSeek-V2 (236B) in each GGUF format.

    .venv/bin/python run/memory_table.py [--ranks 1,2,8] [--ctx 4096]

No file is needed: the tensor list comes from the model's config (the converter's plan),
the per-tensor types from llama.cpp's quantizer rules (``quant_plan``), and each rank's
mapped / copied bytes from the same rules the loader and the pre-load check follow
(``memory_plan``). Prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch  # noqa: E402

from llama_mpi.models.gguf.builder import V2_LITE  # noqa: E402
from llama_mpi.models.gguf.gguf_file import TensorInfo  # noqa: E402
from llama_mpi.models.gguf.hf_to_gguf import _plan  # noqa: E402
from llama_mpi.models.gguf.quant_plan import plan_types  # noqa: E402
from llama_mpi.models.gguf.random_weights import hf_weight_specs  # noqa: E402
from llama_mpi.models.memory_plan import shard_weight_bytes  # noqa: E402

V2_236B = {**V2_LITE, "hidden_size": 5120, "num_hidden_layers": 60, "intermediate_size": 12288,
           "moe_intermediate_size": 1536, "num_attention_heads": 128, "num_key_value_heads": 128,
           "q_lora_rank": 1536, "n_routed_experts": 160, "n_group": 8, "topk_group": 3,
           "topk_method": "group_limited_greedy", "routed_scaling_factor": 16.0}
MODELS = {"DeepSeek-V2-Lite": V2_LITE, "DeepSeek-V2": V2_236B}
FTYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "bf16")
GiB = 2**30


class _Sized:  # what shard_weight_bytes reads of a GGUFFile
    def __init__(self, tensors: dict[str, TensorInfo]) -> None:
        self.tensors = tensors
        size = sum(t.nbytes for t in tensors.values())
        self.path = SimpleNamespace(stat=lambda: SimpleNamespace(st_size=size))


def tensors(cfg: dict, ftype: str) -> dict[str, TensorInfo]:
    outs = _plan(cfg, set(hf_weight_specs(cfg)), "mla")
    types = plan_types(((o.name, o.shape) for o in outs), ftype, cfg["num_hidden_layers"],
                       cfg["n_routed_experts"])
    return {o.name: TensorInfo(o.name, tuple(reversed(o.shape)), types[o.name], 0) for o in outs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="1,2,8")
    ap.add_argument("--ctx", type=int, default=4096, help="KV pool tokens (n_ctx)")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    print("| model | format | file GiB | " + " | ".join(
        f"{n} rank{'s' if n > 1 else ''}: mapped + copied GiB per rank" for n in ranks)
        + f" | KV pool GiB ({args.ctx} tokens) |")
    print("|---|---|---|" + "---|" * len(ranks) + "---|")
    for model, cfg in MODELS.items():
        mcfg = SimpleNamespace(num_heads=cfg["num_attention_heads"], v_head_dim=cfg["v_head_dim"])
        kv = (cfg["num_hidden_layers"] * args.ctx * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
              * 2 / GiB)
        for ftype in FTYPES:
            gf = _Sized(tensors(cfg, ftype))
            size = gf.path.stat().st_size
            cells = []
            for n in ranks:
                w = shard_weight_bytes(gf, mcfg, torch.bfloat16, True, n, n, n > 1)  # type: ignore
                cells.append(f"{w.mapped / GiB:.1f} + {w.copied / GiB:.2f}")
            print(f"| {model} | {ftype.upper()} | {size / GiB:.1f} | " + " | ".join(cells)
                  + f" | {kv:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
