#!/usr/bin/env python
"""Where a decode (tg) step's time goes: inside the weight kernels, and everything else, per
layer, for any GGUF; fused decode (the default) or the eager path.

    .venv/bin/python run/profile_tg.py --model X.gguf [-n 8] [--ctx 128] [--seqs 1] [-t 2]
        [--eager] [--per-step] [--torch-profile [--top 25] [--trace T.json]]

Prefills --ctx tokens for each of --seqs sequences, runs 2 warm-up decode steps of all of
them together, then times -n such steps without any profiler. Per step it prints the wall
time, the time inside the weight products (the C kernels: quantized, bf16 and float32
products, timed inside the fused layer calls; on the eager path every call into the kernel
library that multiplies a weight) and the rest, with the op count outside them: torch ops
(counted in one extra step under a dispatch-counting mode) and calls into native code. Then
per layer: wall, weights, attention over the latent cache, the rest of the layer's native
time, the Python/ctypes time around it, torch ops and native calls. ``--torch-profile``
adds torch.profiler tables (its per-op cost inflates the glue; the figures above do not
use it).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from collections import defaultdict

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# entry points of the kernel library that multiply weights (the rest is glue)
WEIGHT_KERNELS = {"skinny_bf16_matmul", "grouped_bf16_matmul", "batched_skinny_bf16_matmul",
                  "quant_matmul", "grouped_quant_matmul"}


class Counters:
    """Per-layer accumulators; layer -1 is the step outside any layer (embedding, head)."""

    def __init__(self) -> None:
        self.reset()
        self.layer = -1

    def reset(self) -> None:
        self.wall = defaultdict(float)  # seconds per layer (whole layer, Python included)
        self.weights = defaultdict(float)  # seconds in weight products
        self.attn = defaultdict(float)  # seconds in attention over the cache (fused)
        self.native = defaultdict(float)  # seconds inside native calls (all of them)
        self.calls = defaultdict(int)  # native calls (fused layer calls count as one)
        self.weight_calls = defaultdict(int)
        self.ops = defaultdict(int)  # torch ops (counting pass only)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-n", "--steps", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--seqs", type=int, default=1, help="sequences decoded together per step")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="the eager torch path (no fusion)")
    ap.add_argument("--per-step", action="store_true", help="the per-layer table every step")
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", default=None)
    args = ap.parse_args(argv)
    import torch

    from llama_mpi.models.forward_batch import ForwardBatch
    from llama_mpi.models.loader import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, fused_decode=not args.eager)
    n_layers = model.cfg.num_layers
    bs, B = 16, args.seqs
    total = args.ctx + (3 if args.torch_profile else 2) * args.steps + 8
    per_seq = -(-total // bs)
    tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(B)]
    pool = model.make_kv_pool(B * per_seq, bs)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, model.cfg.vocab_size, (total,), generator=g).tolist()
           for _ in range(B)]
    for b in range(B):
        model(ForwardBatch.build([(ids[b][: args.ctx], 0, tables[b])], bs), pool)
    pos = args.ctx

    def step() -> None:
        nonlocal pos
        model(ForwardBatch.build([([ids[b][pos]], pos, tables[b]) for b in range(B)], bs), pool)
        pos += 1

    for _ in range(2):
        step()
    fused = model._fused if model._fused not in (None, False, True) else None
    if not args.eager and fused is None:
        print("fused decode is not available for this model/step: profiling the eager path")
    cnt = Counters()
    lib_stats = _instrument(model, fused, cnt)

    # one step under a dispatch mode that counts torch ops per layer
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), k=None):
            cnt.ops[cnt.layer] += 1
            return func(*a, **(k or {}))

    cnt.reset()
    with CountOps():
        step()
    ops = dict(cnt.ops)
    cnt.reset()
    calls1 = None

    where = "fused" if fused is not None else "eager"
    print(f"{args.model}: {n_layers} layers, {B} sequence(s) at context {args.ctx}, "
          f"{args.threads} threads, {where} decode, load {os.getloadavg()[0]:.2f}")
    steps, per_layer = [], defaultdict(lambda: defaultdict(float))
    for i in range(args.steps):
        cnt.reset()
        lib_stats(True)
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
        lib_stats(False)
        cnt.wall[-1] = wall - sum(v for k, v in cnt.wall.items() if k >= 0)
        if calls1 is None:
            calls1 = dict(cnt.calls)
        weights = sum(cnt.weights.values())
        outside = wall - weights
        n_ops = sum(ops.values())
        n_calls = sum(cnt.calls.values()) - sum(cnt.weight_calls.values())
        steps.append((wall, weights))
        print(f"step {i + 1}: {1000 * wall:.2f} ms, weight kernels {1000 * weights:.2f} ms, "
              f"outside {1000 * outside:.2f} ms ({100 * outside / wall:.0f} %, "
              f"{1000 * outside / n_layers:.3f} ms per layer); outside ops: {n_ops} torch ops, "
              f"{n_calls} native calls besides {sum(cnt.weight_calls.values())} weight "
              f"products")
        for layer in range(-1, n_layers):
            row = per_layer[layer]
            for key, d in (("wall", cnt.wall), ("weights", cnt.weights), ("attn", cnt.attn),
                           ("native", cnt.native)):
                row[key] += d[layer] / args.steps
            row["calls"] = cnt.calls[layer]
            row["weight_calls"] = cnt.weight_calls[layer]
        if args.per_step:
            _table(cnt, ops, n_layers, 1)
    wall = sum(s[0] for s in steps) / len(steps)
    weights = sum(s[1] for s in steps) / len(steps)
    print(f"\nmean over {args.steps} steps: {1000 * wall:.2f} ms/step ({1 / wall:.1f} tok/s per "
          f"sequence), weight kernels {1000 * weights:.2f} ms, outside "
          f"{1000 * (wall - weights):.2f} ms ({100 * (wall - weights) / wall:.1f} %)")
    print("\nper layer (ms per step; 'step' = embedding, per-step metadata, final norm, head):")
    print(f"  {'layer':>5} {'wall':>7} {'weights':>8} {'outside':>8} {'attn':>6} {'C rest':>7} "
          f"{'python':>7} {'torch ops':>9} {'native calls':>12} {'weight calls':>12}")
    for layer in range(-1, n_layers):
        r = per_layer[layer]
        c_rest = r["native"] - r["weights"] - r["attn"]
        python = r["wall"] - r["native"]
        name = "step" if layer < 0 else str(layer)
        print(f"  {name:>5} {1000 * r['wall']:7.3f} {1000 * r['weights']:8.3f} "
              f"{1000 * (r['wall'] - r['weights']):8.3f} {1000 * r['attn']:6.3f} "
              f"{1000 * c_rest:7.3f} {1000 * python:7.3f} {ops.get(layer, 0):9d} "
              f"{int(r['calls'] - r['weight_calls']):12d} {int(r['weight_calls']):12d}")
    if args.torch_profile:
        _torch_profile(args, step)
    return 0


def _table(cnt: Counters, ops: dict, n_layers: int, steps: int) -> None:
    for layer in range(-1, n_layers):
        w, k = cnt.wall[layer], cnt.weights[layer]
        print(f"    layer {layer:>3}: {1000 * w:.3f} ms, outside the weights {1000 * (w - k):.3f}"
              f" ms, {ops.get(layer, 0)} torch ops, {cnt.calls[layer]} native calls")


def _instrument(model, fused, cnt: Counters):
    """Wrap the kernel library, the blocks (eager) or the fused layer call so that time and
    calls land on the current layer. Returns ``stats(on)``: starts / stops the fused path's
    own counters (and adds them to ``cnt`` when stopping)."""
    import numpy as np

    from llama_mpi.models.kernels import cpu_kernels

    lib = cpu_kernels.kernel()

    class Timed:
        def __getattr__(self, name):
            fn = getattr(lib, name)

            def call(*a):
                t = time.perf_counter()
                result = fn(*a)
                dt = time.perf_counter() - t
                cnt.native[cnt.layer] += dt
                cnt.calls[cnt.layer] += 1
                if name in WEIGHT_KERNELS:
                    cnt.weights[cnt.layer] += dt
                    cnt.weight_calls[cnt.layer] += 1
                return result
            return call

    if lib is not None:
        cpu_kernels._LIB = Timed()
    stats = np.zeros((512, 4), dtype=np.float64)
    if fused is not None:
        index = {addr: L.index for addr, L in zip(fused.addrs, fused.layers, strict=True)}
        raw = fused.call

        def layer_call(addr, *a):
            prev, cnt.layer = cnt.layer, index[addr]
            t = time.perf_counter()
            try:
                return raw(addr, *a)
            finally:
                dt = time.perf_counter() - t
                cnt.wall[cnt.layer] += dt
                cnt.native[cnt.layer] += dt
                cnt.calls[cnt.layer] += 1
                cnt.layer = prev
        fused.call = layer_call
        # eager FFN parts of a fused step (all-to-all experts)
        for i, b in enumerate(model.blocks):
            b.ffn_part = _timed_layer(b.ffn_part, i, cnt)
    else:
        for i, b in enumerate(model.blocks):
            model.blocks[i] = _BlockTimer(b, type(b).__call__, i, cnt)

    def lib_stats(on: bool) -> None:
        if lib is None or fused is None:
            return
        ptr = stats.ctypes.data_as(ctypes.c_void_p)
        lib.fused_decode_profile(int(on), None if on else ptr)
        if not on:
            for layer in [*range(len(model.blocks)), -1]:  # row -1: the fused head
                total, w, n, att = stats[layer]
                # the wrapper counted the whole call as native time already
                cnt.weights[layer] += w / 1e9
                cnt.weight_calls[layer] += int(n)
                cnt.calls[layer] += int(n)
                cnt.attn[layer] += att / 1e9
                del total
    return lib_stats


def _timed_layer(fn, layer: int, cnt: Counters):
    def call(*a, **k):
        prev, cnt.layer = cnt.layer, layer
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            cnt.wall[layer] += time.perf_counter() - t
            cnt.layer = prev
    return call


class _BlockTimer:
    """An eager block, timed as its layer (the fused path never calls blocks)."""

    def __init__(self, block, call, layer: int, cnt: Counters) -> None:
        self.__dict__.update(_b=block, _call=call, _layer=layer, _cnt=cnt)

    def __call__(self, *a, **k):
        return _timed_layer(lambda *x, **y: self._call(self._b, *x, **y), self._layer,
                            self._cnt)(*a, **k)

    def __getattr__(self, name):
        return getattr(self._b, name)

    def __setattr__(self, name, value):
        setattr(self._b, name, value)


def _torch_profile(args, step) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            with record_function("step"):
                step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
