#!/usr/bin/env python
"""Profile decode (tg) steps with torch.profiler; print the top ops and the time per part.

    .venv/bin/python run/profile_tg.py --model X.gguf [-n 8] [--ctx 128] [--seqs 1] [-t 2]
        [--top 25] [--trace /tmp/bench/tg-trace.json]

Prefills --ctx tokens for each of --seqs sequences (unprofiled), runs 2 warm-up decode steps
of all of them together, then profiles -n such steps. Prints ops by self CPU time, and the
time per model part (record_function scopes are not in the model, so parts are attributed
by module via a wrapper around each block's attention / FFN / MoE parts). The C kernels are
not aten ops: their time shows only inside the parts; "kernels" times every call into them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-n", "--steps", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--seqs", type=int, default=1, help="sequences decoded together per step")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", default=None)
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from llama_mpi.models.forward_batch import ForwardBatch
    from llama_mpi.models.loader import load_model
    from llama_mpi.moe.moe_layer import MoE

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    kernel_time = _time_kernels()
    bs, B = 16, args.seqs
    total = args.ctx + args.steps + 4
    per_seq = -(-total // bs)
    tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(B)]
    pool = model.make_kv_pool(B * per_seq, bs)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, model.cfg.vocab_size, (total,), generator=g).tolist()
           for _ in range(B)]

    # scope labels per part of a block (wrappers only; the model code is untouched)
    for b in model.blocks:
        kind = "moe" if isinstance(b.ffn, MoE) else "dense_ffn"
        b.attn = _Wrapped(b.attn, "part::attention", record_function)
        b.ffn = _Wrapped(b.ffn, f"part::{kind}", record_function)
        if isinstance(b.ffn.inner, MoE):
            m = b.ffn.inner
            for sub in ("router", "experts", "shared"):
                if getattr(m, sub, None) is not None:
                    setattr(m, sub, _Wrapped(getattr(m, sub), f"part::moe.{sub}",
                                             record_function))

    for b in range(B):
        model(ForwardBatch.build([(ids[b][: args.ctx], 0, tables[b])], bs), pool)
    pos = args.ctx

    def step() -> None:
        nonlocal pos
        model(ForwardBatch.build([([ids[b][pos]], pos, tables[b]) for b in range(B)], bs), pool)
        pos += 1

    for _ in range(2):
        step()
    # first without the torch profiler (its per-op cost would inflate the glue): wall time per
    # step, the part of it inside the C kernels, and the rest, per layer
    kernel_time[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    plain = (time.perf_counter() - t0) / args.steps
    inside = kernel_time[0] / args.steps
    n_layers, outside = model.cfg.num_layers, plain - inside
    print(f"without the profiler: {1000 * plain:.1f} ms/step, {1000 * inside:.1f} ms in the C "
          f"kernels, {1000 * outside:.1f} ms outside ({100 * outside / plain:.0f} %, "
          f"{1000 * outside / n_layers:.2f} ms per layer over {n_layers} layers)")
    kernel_time[0] = 0.0
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            with record_function("step"):
                step()
        wall = time.perf_counter() - t0
    print(f"{args.steps} decode steps of {B} sequence(s) at context {args.ctx}: "
          f"{1000 * wall / args.steps:.1f} ms/step under the profiler, of which "
          f"{1000 * kernel_time[0] / args.steps:.1f} ms in the C kernels "
          f"({os.getloadavg()[0]:.2f} load)")
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                              row_limit=15))
    parts = [e for e in ka if e.key.startswith("part::") or e.key == "step"]
    print("\nmodel parts (inclusive CPU time, ms per step):")
    for e in sorted(parts, key=lambda e: -e.cpu_time_total):
        print(f"  {e.key:<22} {e.cpu_time_total / 1000 / args.steps:9.2f} ms  "
              f"({e.count // args.steps} calls/step)")
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}", file=sys.stderr)
    return 0


def _time_kernels() -> list[float]:
    """Wrap every C kernel entry point with a timer; returns the running total (seconds)."""
    from llama_mpi.models import cpu_kernels

    lib, total = cpu_kernels.kernel(), [0.0]
    if lib is None:
        return total

    class Timed:
        def __getattr__(self, name):
            fn = getattr(lib, name)

            def call(*a):
                t = time.perf_counter()
                result = fn(*a)
                total[0] += time.perf_counter() - t
                return result
            return call

    cpu_kernels._LIB = Timed()
    return total


class _Wrapped:
    """Proxy that runs a callable module inside a record_function scope."""

    def __init__(self, inner, label, record_function):
        self.__dict__.update(inner=inner, label=label, rf=record_function)

    @property
    def __class__(self):  # so that isinstance(block.ffn, SwiGLU) still holds
        return type(self.inner)

    def __call__(self, *a, **k):
        with self.rf(self.label):
            return self.inner(*a, **k)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)


if __name__ == "__main__":
    sys.exit(main())
