"""Run under mpirun: the sharded model (EP + TP) on a GGUF, compared on rank 0 with the
single-process model on the same file and with transformers' logits saved by the test.

argv: gguf ref.pt dtype skew vocab_parallel; prints one JSON line per mode from rank 0.
"""

from __future__ import annotations

import json
import sys

import torch

from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.models.loader import load_model
from llama_mpi.mpi_server.config import ServerConfig
from llama_mpi.mpi_server.rank_runtime import load_shard
from llama_mpi.parallel.bootstrap import init_parallel

BLOCK = 4


def run(model, seqs: list[list[int]]) -> torch.Tensor:
    """Prefill all but the last token of every sequence (all logits), then decode the last
    tokens together; returns the logits of every position, sequence after sequence."""
    tables, nxt = [], 0
    for s in seqs:
        n = -(-len(s) // BLOCK)
        tables.append(list(range(nxt, nxt + n))[::-1])  # reversed: addressing via the table
        nxt += n
    pool = model.make_kv_pool(nxt, BLOCK)
    pre = model(ForwardBatch.build([(s[:-1], 0, t) for s, t in zip(seqs, tables, strict=True)],
                                   BLOCK, all_logits=True), pool)
    dec = model(ForwardBatch.build([([s[-1]], len(s) - 1, t)
                                    for s, t in zip(seqs, tables, strict=True)], BLOCK), pool)
    if pre is None:
        return None
    parts, start = [], 0
    for i, s in enumerate(seqs):
        parts += [pre[start : start + len(s) - 1], dec[i : i + 1]]
        start += len(s) - 1
    return torch.cat(parts)


def skew(model, n_ranks: int) -> None:
    """Route every token to rank 0's experts: a selection bias that rules out the others."""
    for block in model.blocks:
        router = getattr(block.ffn, "router", None)
        if router is not None:
            X = router.weight.shape[0]
            bias = torch.zeros(X)
            bias[X // n_ranks :] = -1e9
            router.bias = bias


def main() -> None:
    path, ref_path, dtype, do_skew, vocab_par = sys.argv[1:6]
    ctx = init_parallel("cpu", timeout=60)
    ref = torch.load(ref_path)
    seqs, hf = ref["seqs"], ref["logits"]
    for moe_comm in ("alltoall", "allreduce"):
        for mla in (True, False):
            cfg = ServerConfig(model=path, dtype=dtype, moe_comm=moe_comm, enable_mla=mla,
                               vocab_parallel=vocab_par == "1")
            model = load_shard(cfg, ctx)
            if do_skew == "1":
                skew(model, ctx.world_size)
            got = run(model, seqs)
            counts = ctx.comm.comm.gather(model.param_counts(), root=0)
            if ctx.rank != 0:
                continue
            single = load_model(path, dtype=dtype, absorbed_mla=mla)
            if do_skew == "1":
                skew(single, ctx.world_size)
            want = run(single, seqs)
            print(json.dumps({
                "moe_comm": moe_comm, "mla": mla,
                "max_diff_single": (got - want).abs().max().item(),
                "max_diff_hf": (got - hf).abs().max().item(),
                "rel_single": ((got - want).norm() / want.norm()).item(),
                "rel_hf": ((got - hf).norm() / hf.norm()).item(),
                "agree_single": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
                "agree_hf": (got.argmax(-1) == hf.argmax(-1)).float().mean().item(),
                "params": counts, "single_params": single.param_counts(),
            }), flush=True)
    ctx.comm.barrier()


if __name__ == "__main__":
    main()
