"""mpirun worker: each collective vs. the value every rank computes itself in numpy.

Inputs come from numpy generators seeded with (seed, source rank, tag), so any rank can
rebuild any other rank's input. Values are small integers: exact in bf16/fp16 sums.
Prints `RESULT rank=R <check> ok|FAIL ...` per check.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from llama_mpi.parallel.bootstrap import init_parallel
from llama_mpi.parallel.guard import run_guarded

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIDTH = 8


def gen(seed: int, src: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([seed, src, tag])


def report(rank: int, name: str, got: torch.Tensor | object, want: np.ndarray | object) -> None:
    if isinstance(got, torch.Tensor):
        got_np = got.float().numpy()
        ok = got_np.shape == want.shape and np.array_equal(got_np, want)
    else:
        ok = got == want
    verdict = "ok" if ok else f"FAIL got={got!r} want={want!r}".replace("\n", " ")
    sys.stdout.write(f"RESULT rank={rank} {name} {verdict}\n")  # one write: less interleaving
    sys.stdout.flush()


def a2a_counts(seed: int, src: int, world: int) -> list[int]:
    counts = gen(seed, src, 3).integers(0, 4, size=world)
    counts[(src + 1) % world] = 0  # every rank gets at least one zero split
    if src == world - 1:
        counts[:] = 0  # and one rank sends nothing at all
    return counts.tolist()


def main(backend: str, seed: int) -> None:
    ctx = init_parallel(device="cpu", backend=backend, timeout=30.0)
    comm, r, world = ctx.comm, ctx.rank, ctx.world_size

    for name, dt in DTYPES.items():
        xs = [gen(seed, s, 1).integers(-8, 9, size=(5, WIDTH)) for s in range(world)]
        got = comm.all_reduce(torch.from_numpy(xs[r]).to(dt))
        report(r, f"all_reduce_{name}", got, np.sum(xs, axis=0).astype(np.float32))

    for name in ("fp32", "bf16"):
        for dim in (0, 1):
            xs = [gen(seed, s, 2).integers(-50, 51, size=(3, WIDTH)) for s in range(world)]
            got = comm.all_gather(torch.from_numpy(xs[r]).to(DTYPES[name]), dim=dim)
            report(r, f"all_gather_dim{dim}_{name}", got, np.concatenate(xs, axis=dim))

    counts = [a2a_counts(seed, s, world) for s in range(world)]
    for name in ("fp32", "bf16"):
        shapes = [(sum(counts[s]), WIDTH) for s in range(world)]
        xs = [gen(seed, s, 4).integers(-100, 101, size=shapes[s]) for s in range(world)]
        got, recv_counts = comm.all_to_all(torch.from_numpy(xs[r]).to(DTYPES[name]), counts[r])
        want = [xs[s][sum(counts[s][:r]) : sum(counts[s][: r + 1])] for s in range(world)]
        report(r, f"all_to_all_{name}", got, np.concatenate(want, axis=0).astype(np.float32))
        report(r, f"all_to_all_counts_{name}", recv_counts, [counts[s][r] for s in range(world)])
        # the reply: received rows go back with the counts both sides know, none exchanged
        back, back_counts = comm.all_to_all(got, recv_counts, counts[r])
        report(r, f"all_to_all_reply_{name}", back, xs[r].astype(np.float32))
        report(r, f"all_to_all_reply_counts_{name}", back_counts, counts[r])

    root = world - 1
    vals = gen(seed, root, 5).integers(0, 9, 4).tolist()
    expected_obj = {"seed": seed, "root": root, "vals": vals}
    got_obj = comm.broadcast_object(expected_obj if r == root else None, root=root)
    report(r, "broadcast_object", got_obj, expected_obj)

    for name in ("fp32", "bf16"):
        root = 1 % world
        xs = [gen(seed, s, 6).integers(-100, 101, size=(4, WIDTH)) for s in range(world)]
        t = torch.from_numpy(xs[r]).to(DTYPES[name])
        comm.broadcast(t, root=root)
        report(r, f"broadcast_{name}", t, xs[root].astype(np.float32))

    comm.barrier()
    report(r, "barrier", True, True)
    comm.close()


if __name__ == "__main__":
    run_guarded(main, sys.argv[1], int(sys.argv[2]))
