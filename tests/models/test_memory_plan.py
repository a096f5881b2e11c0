"""The memory estimate made before loading agrees with what the loader then keeps mapped and
copies (``WeightPolicy`` counts every weight as it loads it), for whole models and shards."""

from __future__ import annotations

import pytest
import torch

from llama_mpi.models.loader import load_model, open_model_file
from llama_mpi.models.memory_plan import estimate_load, shard_weight_bytes
from llama_mpi.models.shard import Shard

# the estimate counts norms and the router at file size and an uneven FFN split as even:
# off by a few percent on these tiny models, less on real ones
REL_TOL = 0.05


def close(a: int, b: int) -> bool:
    return abs(a - b) <= REL_TOL * max(a, b, 1)


@pytest.mark.parametrize("ftype,backend", [("q4_k_m", "torch"), ("q8_0", "torch"),
                                           ("q8_0", "dequantize"), ("bf16", "torch")])
@pytest.mark.parametrize("ranks", [1, 2])
def test_estimate_matches_what_the_loader_keeps(reference, ftype, backend, ranks):
    _, path = reference("quant", ftype, "mla")
    gf, cfg = open_model_file(path)
    shard = Shard(tp_rank=0, tp_size=ranks, ep_rank=0, ep_size=ranks)
    model = load_model(path, dtype="bfloat16", quant_backend=backend, shard=shard)
    est = shard_weight_bytes(gf, cfg, torch.bfloat16, backend != "dequantize", ranks, ranks)
    # norms are loaded outside the policy's count; they are tiny
    assert close(est.mapped, model.policy.mapped_bytes), (est, model.policy)
    assert close(est.copied, model.policy.copied_bytes), (est, model.policy)


def test_kept_blocks_are_mapped_and_dequantizing_copies(reference):
    _, path = reference("quant", "q4_k_m", "mla")
    gf, cfg = open_model_file(path)
    kept = shard_weight_bytes(gf, cfg, torch.bfloat16, True)
    dense = shard_weight_bytes(gf, cfg, torch.bfloat16, False)
    # copied: k_b / v_b (dense for the per-head products) and norms; 24 % on this toy with
    # a 256-wide latent and 3 layers, ~1 % on V2-Lite (113 MB next to 10 GB)
    assert kept.copied < 0.3 * kept.mapped
    assert dense.copied > 3 * kept.mapped  # bf16 is ~3.5x the Q4_K_M bytes
    est = estimate_load(gf, cfg, torch.bfloat16, True, kv_tokens=1024, local_ranks=2)
    layers, width = cfg.num_layers, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert est.kv_pool == 2 * layers * 1024 * width * 2
    assert est.mapped_weights <= path.stat().st_size


def test_without_mmap_every_weight_is_copied(reference):
    _, path = reference("quant", "q4_k_m", "mla")
    gf, cfg = open_model_file(path)
    mapped = estimate_load(gf, cfg, torch.bfloat16, True, kv_tokens=16)
    read = estimate_load(gf, cfg, torch.bfloat16, True, kv_tokens=16, use_mmap=False)
    assert read.mapped_weights == 0
    assert read.copied_weights == mapped.mapped_weights + mapped.copied_weights
    model = load_model(path, dtype="bfloat16", quant_backend="torch", use_mmap=False)
    assert model.policy.mapped_bytes == 0
    assert close(read.copied_weights, model.policy.copied_bytes)
