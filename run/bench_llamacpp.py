#!/usr/bin/env python
"""pp/tg benchmark of llama.cpp (through llama-cpp-python) on a GGUF, the way llama-bench does it.

    /tmp/lcpp-venv/bin/python run/bench_llamacpp.py --model X.gguf [-p 512] [-n 128] [-r 3] \\
        [-t 2] [--json out.json]

Run it with the python of a venv that has llama-cpp-python (e.g. /tmp/lcpp-venv, built with
CMAKE_ARGS="-DGGML_NATIVE=ON"), not the project's venv.

How it measures (mirrors llama-bench's test_prompt / test_gen, via the low-level C API):
  context: llama_cpp.Llama(model_path, n_threads=T, n_threads_batch=T, n_ctx=1024,
           n_batch=512, n_ubatch=512, n_gpu_layers=0, logits_all=False); the KV cache is the
           library default (f16) as in llama-bench. A deepseek2 GGUF without q LoRA whose layer
           count is not 26/27 (bench4) fails to load (llama.cpp reads "no q LoRA" from the layer
           count); it is then loaded again with kv_overrides q_lora_rank=0 (recorded in JSON).
  pp<P>:  clear the KV memory, then llama_decode of the P prompt tokens in n_batch chunks,
          then llama_synchronize; tokens/s = P / wall time of that.
  tg<N>:  clear the KV memory, then N times llama_decode of one token (positions 0..N-1,
          no prompt, as llama-bench's tg) + llama_synchronize; tokens/s = N / wall time.
  Tokens are fixed pseudo-random ids (seed 0). One unmeasured warm-up of each test first
  (a full pp, a few tg steps), then -r repetitions; min/median/max over them. Timings from
  llama_perf_context (t_p_eval / t_eval) are recorded alongside as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import loadavg, summarize, uptime_line  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import llama_cpp as L

    la_load = loadavg()
    t0 = time.perf_counter()
    kw = dict(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
              n_ctx=args.n_ctx, n_batch=args.n_batch, n_ubatch=args.n_batch, n_gpu_layers=0,
              logits_all=False, verbose=False)
    overrides = None
    try:
        llm = L.Llama(**kw)
    except ValueError:
        # llama.cpp takes a deepseek2 model without q LoRA for "lite" only when it has 26 or 27
        # layers, else it wants deepseek2.attention.q_lora_rank, which V2-Lite-shaped GGUFs
        # with other layer counts (bench4) lack: say 0 (= no q LoRA) and try again.
        overrides = {"deepseek2.attention.q_lora_rank": 0}
        print(f"load failed; retrying with kv_overrides={overrides}", file=sys.stderr)
        llm = L.Llama(**kw, kv_overrides=overrides)
    load_s = time.perf_counter() - t0
    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()
    rng = random.Random(0)
    prompt = [rng.randrange(n_vocab) for _ in range(max(args.n_prompt, 1))]
    gen_ids = [rng.randrange(n_vocab) for _ in range(max(args.n_gen, 1))]

    def clear() -> None:
        if hasattr(L, "llama_get_memory") and hasattr(L, "llama_memory_clear"):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
        elif hasattr(L, "llama_kv_self_clear"):
            L.llama_kv_self_clear(ctx)
        else:
            L.llama_kv_cache_clear(ctx)

    def decode(tokens: list[int]) -> None:
        arr = (L.llama_token * len(tokens))(*tokens)
        batch = L.llama_batch_get_one(arr, len(tokens))
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def perf() -> dict:
        try:
            d = L.llama_perf_context(ctx)
            return {"t_p_eval_ms": d.t_p_eval_ms, "n_p_eval": d.n_p_eval,
                    "t_eval_ms": d.t_eval_ms, "n_eval": d.n_eval}
        except Exception:  # noqa: BLE001 - optional cross-check
            return {}

    def reset_perf() -> None:
        try:
            L.llama_perf_context_reset(ctx)
        except Exception:  # noqa: BLE001
            pass

    def pp_once() -> tuple[float, dict]:
        clear()
        reset_perf()
        t = time.perf_counter()
        for i in range(0, len(prompt), args.n_batch):
            decode(prompt[i:i + args.n_batch])
        L.llama_synchronize(ctx)
        return time.perf_counter() - t, perf()

    def tg_once(n: int) -> tuple[float, dict]:
        clear()
        reset_perf()
        t = time.perf_counter()
        for i in range(n):
            decode([gen_ids[i]])
            L.llama_synchronize(ctx)
            if not args.no_progress:
                sys.stderr.write(f"\rtg{args.n_gen}: {i + 1}/{n}")
                sys.stderr.flush()
        dt = time.perf_counter() - t
        if not args.no_progress:
            sys.stderr.write("\n")
        return dt, perf()

    tests = []
    if args.n_prompt:
        la0, up0 = loadavg(), uptime_line()
        pp_once()  # warm-up
        runs = []
        for k in range(args.repetitions):
            runs.append(pp_once())
            if not args.no_progress:
                print(f"pp{args.n_prompt} rep {k + 1}: {args.n_prompt / runs[-1][0]:.2f} t/s",
                      file=sys.stderr)
        times = [r[0] for r in runs]
        tests.append({"test": f"pp{args.n_prompt}", "n_tokens": args.n_prompt, "seconds": times,
                      "tokens_per_s": summarize([args.n_prompt / t for t in times]),
                      "llama_perf": [r[1] for r in runs], "loadavg_before": la0,
                      "loadavg_after": loadavg(), "uptime_before": up0,
                      "uptime_after": uptime_line()})
    if args.n_gen:
        la0, up0 = loadavg(), uptime_line()
        tg_once(min(4, args.n_gen))  # warm-up
        runs = [tg_once(args.n_gen) for _ in range(args.repetitions)]
        times = [r[0] for r in runs]
        tests.append({"test": f"tg{args.n_gen}", "n_tokens": args.n_gen, "seconds": times,
                      "tokens_per_s": summarize([args.n_gen / t for t in times]),
                      "ms_per_token_median": 1000 * statistics.median(times) / args.n_gen,
                      "llama_perf": [r[1] for r in runs], "loadavg_before": la0,
                      "loadavg_after": loadavg(), "uptime_before": up0,
                      "uptime_after": uptime_line()})
    res = {"tool": "llama.cpp via llama-cpp-python " + getattr(L, "__version__", "?"),
           "mode": "llama.cpp", "ranks": 1, "threads_per_rank": args.threads, "moe_comm": None,
           "model": args.model, "file_bytes": os.path.getsize(args.model), "dtype": "gguf",
           "load_s": load_s, "loadavg_at_load": la_load,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
           "n_prompt": args.n_prompt, "n_gen": args.n_gen, "repetitions": args.repetitions,
           "n_ctx": args.n_ctx, "n_batch": args.n_batch, "kv_overrides": overrides,
           "system_info":
           L.llama_print_system_info().decode(errors="replace"),
           "python": platform.python_version(), "hostname": platform.node(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tests": tests}
    size = res["file_bytes"] / 2**30
    print("| model | size | backend | threads | test | t/s (median) | min | max |")
    print("|---|---|---|---|---|---|---|---|")
    for t in tests:
        s = t["tokens_per_s"]
        print(f"| {Path(args.model).name} | {size:.2f} GiB | llama.cpp CPU | {args.threads} | "
              f"{t['test']} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} |")
    print(f"load {load_s:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB; load avg before/after: "
          + ", ".join(f"{t['test']} {t['loadavg_before'][0]}->{t['loadavg_after'][0]}"
                      for t in tests))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
