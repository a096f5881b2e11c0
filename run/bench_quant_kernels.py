#!/usr/bin/env python
"""Decode throughput of the quantized-weight kernels against the bf16 kernel.

    .venv/bin/python run/bench_quant_kernels.py [-t 2] [--types Q4_K,Q8_0] [--rows 1,8]
        [--shapes 2048x2048,102400x2048] [--seconds 0.5]

For each weight shape [N x K] and type, times ``quant_kernels.matmul`` with M activation rows
(already quantized, as a layer reuses them) and ``fast_linear.linear`` on a bf16 weight of the
same shape, and prints GB/s of weight bytes streamed (each call reads the whole weight once)
and the time per call. The best of several short batches is kept: the machine may be shared,
so also note ``uptime`` around a run. Weights are random bytes with sane fp16 scales (every
other byte pattern is a valid block); values do not change the speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")


def best_time(fn, seconds: float) -> float:
    """Seconds per call: the best of ~10 batches filling ``seconds`` in all."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(seconds / 10 / once))
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def random_blocks(qt, n: int, k: int):
    import torch
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as QT

    block, size = GGML_QUANT_SIZES[qt]
    w = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8)
    d = torch.full((n, k // block, 1), 0.02, dtype=torch.float16).view(torch.uint8)
    where = {QT.Q6_K: [208], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q5_1: [0, 2]}.get(qt, [0])
    for o in where:  # d (and dmin / m) fields
        w[..., o:o + 2] = d
    return w.view(n, -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--types", default="Q4_K,Q8_0")
    ap.add_argument("--rows", default="1,8", help="activation rows M")
    ap.add_argument("--shapes", default="2048x2048,102400x2048", help="N x K weight shapes")
    ap.add_argument("--seconds", type=float, default=0.5, help="timing budget per case")
    args = ap.parse_args(argv)

    import torch
    from gguf import GGMLQuantizationType as QT

    from llama_mpi.models.kernels import fast_linear
    from llama_mpi.models.kernels import quant_kernels as qk

    if not qk.available():
        print("quantized-weight kernels unavailable here", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    types = [QT[t] for t in args.types.split(",")]
    rows = [int(m) for m in args.rows.split(",")]
    print(f"threads {args.threads}; load average {os.getloadavg()[0]:.2f}")

    def report(n: int, k: int, name: str, m: int, fn, nbytes: int) -> None:
        s = best_time(fn, args.seconds)
        print(f"{n:>6} x {k:<5} {name:<5} M={m:<2} {s * 1e6:9.1f} us "
              f"{nbytes / s / 1e9:6.1f} GB/s", flush=True)

    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for qt in types:
            w = random_blocks(qt, n, k)
            for m in rows:
                act = qk.quantize_activations(torch.randn(m, k))
                y = torch.empty(m, n, dtype=torch.bfloat16)
                report(n, k, qt.name, m, partial(qk.matmul, qt, w, k, act, out=y), w.numel())
        wb = torch.randn(n, k).bfloat16()
        for m in rows:
            x = torch.randn(m, k).bfloat16()
            report(n, k, "bf16", m, partial(fast_linear.linear, x, wb), 2 * wb.numel())
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
