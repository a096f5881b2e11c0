"""How much memory one rank's shard of a GGUF model will take, before loading it.

Follows the loader's rules (``weight_loader``) tensor by tensor from the file's tensor table:
a kept quantized tensor stays in the file mapping (``mapped``), a tensor in the compute dtype
of its file type is mapped too, everything dequantized, converted or concatenated (the dense
gate|up pairs) is ``copied``. Each tensor counts the share this rank holds: experts by EP
rank, per-head and FFN-column tensors by TP rank, the LM head by vocabulary rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

import torch
from gguf import GGML_QUANT_SIZES

from llama_mpi.models.config import ModelConfig
from llama_mpi.models.gguf.gguf_file import GGUFFile, TensorInfo
from llama_mpi.models.memory_budget import MemoryEstimate
from llama_mpi.models.quant_weight import KEPT_TYPES
from llama_mpi.models.weight_loader import NATIVE_DTYPES

_EXPERTS = re.compile(r"\.ffn_(gate|up|down)_exps\.")
_PER_HEAD = re.compile(r"\.attn_(q|q_b|kv_b|k_b|v_b|output)\.")
_FFN_COLUMNS = re.compile(r"\.ffn_(gate|up|down)(_shexp)?\.weight$")
_DENSE_ALWAYS = re.compile(r"(_norm\.weight|\.attn_(k_b|v_b|kv_b)\.weight|ffn_gate_inp|\.bias)$")
# stacked at load (gate|up; q or q_a | kv_a): dense ones are copied into one tensor
_STACKED = re.compile(r"(\.ffn_(gate|up)(_exps|_shexp)?|\.attn_(q|q_a|kv_a_mqa))\.weight$")


@dataclass(frozen=True)
class WeightBytes:
    mapped: int  # file pages the weights are read from in place
    copied: int  # anonymous memory: dequantized / converted / concatenated weights


def shard_weight_bytes(gf: GGUFFile, cfg: ModelConfig, dtype: torch.dtype, keep_quantized: bool,
                       tp_size: int = 1, ep_size: int = 1, vocab_parallel: bool = False
                       ) -> WeightBytes:
    mapped = copied = 0
    size = torch.tensor([], dtype=dtype).element_size()
    for name, info in gf.tensors.items():
        share = _share(name, tp_size, ep_size, vocab_parallel)
        kept = (keep_quantized and info.qtype in KEPT_TYPES and not _DENSE_ALWAYS.search(name)
                and _columns_stay_blocks(name, info, cfg, tp_size))
        if kept or (NATIVE_DTYPES.get(info.qtype) == dtype and not _STACKED.search(name)):
            mapped += int(info.nbytes * share)
        else:
            copied += int(prod(info.ne) * share) * size
    return WeightBytes(mapped, copied)


def _share(name: str, tp: int, ep: int, vocab_parallel: bool) -> float:
    if _EXPERTS.search(name):
        return 1 / ep
    if _PER_HEAD.search(name) or _FFN_COLUMNS.search(name):
        return 1 / tp
    if name == "output.weight" and vocab_parallel:
        return 1 / tp
    return 1.0


def _columns_stay_blocks(name: str, info: TensorInfo, cfg: ModelConfig, tp: int) -> bool:
    """A TP slice along the row stays quantized when it falls between blocks."""
    block = GGML_QUANT_SIZES[info.qtype][0]
    if ".attn_output." in name:
        return (cfg.num_heads // tp * cfg.v_head_dim) % block == 0
    if re.search(r"\.ffn_down(_shexp)?\.weight$", name):
        return info.ne[0] // block >= tp  # block-aligned split (Shard.columns)
    return True


def estimate_load(gf: GGUFFile, cfg: ModelConfig, dtype: torch.dtype, keep_quantized: bool,
                  kv_tokens: int, tp_size: int = 1, ep_size: int = 1,
                  vocab_parallel: bool = False, local_ranks: int = 1, use_mmap: bool = True
                  ) -> MemoryEstimate:
    """What loading this rank's shard and its KV pool adds, for ``local_ranks`` such ranks on
    this machine (their copies add up; their mapped shards share one file's page cache).
    Without ``use_mmap`` every weight is read into anonymous memory."""
    w = shard_weight_bytes(gf, cfg, dtype, keep_quantized, tp_size, ep_size, vocab_parallel)
    if not use_mmap:
        w = WeightBytes(0, w.mapped + w.copied)
    size = torch.tensor([], dtype=dtype).element_size()
    kv = cfg.num_layers * kv_tokens * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    n = max(1, local_ranks)
    est = MemoryEstimate(mapped_weights=min(w.mapped * n, gf.path.stat().st_size),
                         copied_weights=w.copied * n, kv_pool=kv * n)
    est.runtime *= n
    return est
