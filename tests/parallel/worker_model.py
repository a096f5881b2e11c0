"""Run under mpirun: the sharded model (EP + TP) on a GGUF, compared on rank 0 with the
single-process model on the same file and with transformers' logits saved by the test.

argv: gguf ref.pt dtype skew vocab_parallel [fused]; prints one JSON line per mode from rank 0.
With ``fused`` = 1 each line instead compares the sharded model's fused decode steps with its
eager ones (and the single-process eager model): greedy tokens and every step's logits.
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


def greedy(model, seqs: list[list[int]], steps: int, sync: bool = True
           ) -> tuple[list[list[int]], torch.Tensor | None]:
    """Prefill every sequence together, then ``steps`` greedy decode steps of all of them
    together and 2 of the first alone; returns the tokens and every step's logits. ``sync``:
    every rank takes rank 0's tokens (a rank without logits has none of its own)."""
    seqs = [list(s) for s in seqs]
    tables, nxt = [], 0
    for s in seqs:
        n = -(-(len(s) + steps + 3) // BLOCK)
        tables.append(list(range(nxt, nxt + n))[::-1])
        nxt += n
    pool = model.make_kv_pool(nxt, BLOCK)
    which = list(range(len(seqs)))
    out = [model(ForwardBatch.build([(s, 0, t) for s, t in zip(seqs, tables, strict=True)],
                                    BLOCK), pool)]
    for i in range(steps + 3):
        if out[-1] is not None:
            for row, b in enumerate(which):
                seqs[b].append(int(out[-1][row].argmax()))
        if sync:
            seqs = _COMM.comm.bcast(seqs if _COMM.rank == 0 else None, root=0)
        if i == steps + 2:
            break
        which = list(range(len(seqs))) if i < steps else [0]
        out.append(model(ForwardBatch.build([([seqs[b][-1]], len(seqs[b]) - 1, tables[b])
                                             for b in which], BLOCK), pool))
    return seqs, (torch.cat(out) if out[-1] is not None else None)


_COMM = None


def fused_rows(ctx, path, dtype, vocab_par) -> None:
    """Per mode: the sharded model with fused decode on and off, and one process eager."""
    ref = torch.load(sys.argv[2])
    seqs = ref["seqs"]
    for moe_comm in ("alltoall", "allreduce"):
        for mla in (True, False):
            cfg = ServerConfig(model=path, dtype=dtype, moe_comm=moe_comm, enable_mla=mla,
                               vocab_parallel=vocab_par == "1")
            model = load_shard(cfg, ctx)
            model.fused_decode = False
            eager_text, eager = greedy(model, seqs, 4)
            model.fused_decode = True
            fused_text, fused = greedy(model, seqs, 4)
            native = type(model._fused).__name__
            if ctx.rank != 0:
                continue
            single = load_model(path, dtype=dtype, absorbed_mla=mla, fused_decode=False)
            single_text, want = greedy(single, seqs, 4, sync=False)
            print(json.dumps({
                "moe_comm": moe_comm, "mla": mla, "decoder": native,
                "same_text_eager": fused_text == eager_text,
                "same_text_single": fused_text == single_text,
                "max_diff_eager": (fused - eager).abs().max().item(),
                "rel_eager": ((fused - eager).norm() / eager.norm()).item(),
                "rel_single": ((fused - want).norm() / want.norm()).item(),
            }), flush=True)
    ctx.comm.barrier()


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
    global _COMM
    path, ref_path, dtype, do_skew, vocab_par = sys.argv[1:6]
    ctx = init_parallel("cpu", timeout=60)
    _COMM = ctx.comm
    if len(sys.argv) > 6 and sys.argv[6] == "1":
        return fused_rows(ctx, path, dtype, vocab_par)
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
