#!/usr/bin/env python
"""Offline llama-bench-style benchmark of llama-mpi: prompt processing (pp) and generation (tg).

    run/bench --model X.gguf [-p 512] [-n 128] [-r 3] [-t 2] [--json out.json]
    run/bench --model X.gguf --mpi 2 --moe-comm alltoall      # EP+TP over 2 MPI ranks
    run/bench --model X.gguf --layer-split 2                   # layer split (CPU "devices")

What is measured (as llama-bench does it):
  pp<P>: one forward step of one sequence with P new tokens on an empty cache (the prefill),
         logits of the last token included; tokens/s = P / wall time of that step.
  tg<N>: N decode steps of one sequence, one token per step, starting from an empty cache
         (positions 0..N-1, like llama-bench's tg which has no prompt); logits of every step
         included; tokens/s = N / wall time of the N steps.
  Token ids are fixed pseudo-random ids (seed 0), not sampled, so runs are deterministic.
  Each test runs once unmeasured (warm-up: a full pp, a few tg steps), then -r times; min,
  median and max tokens/s over the repetitions are reported.
  load_s: wall time of load_model / load_shard (max over ranks). peak_rss_mib: ru_maxrss of
  the process (max over ranks under MPI; file-backed mmap pages that were touched count).
  The 1-minute load average (os.getloadavg) is recorded before and after every test.

Under --mpi N this script re-launches itself with ``.venv/bin/mpirun -np N python bench.py
--worker ...``: every rank loads its shard (load_shard), rank 0 publishes every ForwardBatch on
the StepChannel before running it, the other ranks follow in run_worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import AnonPeak, loadavg, summarize, uptime_line  # noqa: E402

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

REPO = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 16


# ------------------------------------------------------------------------------ helpers




def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class Progress:
    """tqdm if installed, else a plain stderr bar; silent when disabled."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.n, self.enabled, self._bar = total, 0, enabled, None
        self.desc = ""
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True,
                             leave=False)
        except ImportError:
            self._bar = None

    def set(self, desc: str) -> None:
        self.desc = desc
        if self.enabled and self._bar is not None:
            self._bar.set_description(desc)

    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(k)
            return
        width = 30
        done = int(width * self.n / max(self.total, 1))
        sys.stderr.write(f"\r{self.desc:<12} [{'#' * done}{'.' * (width - done)}] "
                         f"{self.n}/{self.total}")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")




# ------------------------------------------------------------------------------ the measurement
def run_tests(model, step, n_prompt: int, n_gen: int, reps: int, warmup: bool,
              show_progress: bool) -> list[dict]:
    """``step(batch, pool)`` runs one forward step (and publishes it under MPI)."""
    import torch

    from llama_mpi.models.forward_batch import ForwardBatch

    vocab = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (max(n_prompt, 1),), generator=gen).tolist()
    gen_ids = torch.randint(0, vocab, (max(n_gen, 1),), generator=gen).tolist()
    n_blocks = -(-max(n_prompt, n_gen, 1) // BLOCK_SIZE)
    table = list(range(n_blocks))
    pool = model.make_kv_pool(n_blocks, BLOCK_SIZE)
    tg_warm = min(n_gen, 4)
    # two untimed prefills: the first passes after loading run ~25 % slow (measured); a
    # server is long-lived, so the steady state is the figure that matters
    pp_warm = 2
    total = reps * ((1 if n_prompt else 0) + n_gen)
    if warmup:
        total += (pp_warm if n_prompt else 0) + tg_warm
    bar = Progress(total, show_progress)
    results = []

    def pp_once() -> float:
        batch = ForwardBatch.build([(prompt, 0, table)], BLOCK_SIZE)
        t0 = time.perf_counter()
        step(batch, pool)
        dt = time.perf_counter() - t0
        bar.update()
        return dt

    def tg_once(steps: int) -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            step(ForwardBatch.build([([gen_ids[i]], i, table)], BLOCK_SIZE), pool)
            bar.update()
        return time.perf_counter() - t0

    if n_prompt:
        bar.set(f"pp{n_prompt}")
        la0, up0 = loadavg(), uptime_line()
        if warmup:
            for _ in range(pp_warm):
                pp_once()
        times = [pp_once() for _ in range(reps)]
        results.append({"test": f"pp{n_prompt}", "n_tokens": n_prompt, "seconds": times,
                        "tokens_per_s": summarize([n_prompt / t for t in times]),
                        "loadavg_before": la0, "loadavg_after": loadavg(),
                        "uptime_before": up0, "uptime_after": uptime_line()})
    if n_gen:
        bar.set(f"tg{n_gen}")
        la0, up0 = loadavg(), uptime_line()
        if warmup:
            tg_once(tg_warm)
        times = [tg_once(n_gen) for _ in range(reps)]
        results.append({"test": f"tg{n_gen}", "n_tokens": n_gen, "seconds": times,
                        "tokens_per_s": summarize([n_gen / t for t in times]),
                        "ms_per_token_median": 1000 * statistics.median(times) / n_gen,
                        "loadavg_before": la0, "loadavg_after": loadavg(),
                        "uptime_before": up0, "uptime_after": uptime_line()})
    bar.close()
    return results


def model_info(path: str, model) -> dict:
    counts = model.param_counts() if hasattr(model, "param_counts") else {}
    return {"model": str(path), "file_bytes": os.path.getsize(path),
            "params_here": int(sum(counts.values())) if counts else None,
            "layers": model.cfg.num_layers, "dtype": str(model.opts.dtype).removeprefix("torch.")}


def weight_bytes(model) -> dict:
    policy = getattr(model, "policy", None)
    if policy is None:
        return {}
    return {"weights_mapped_mib": policy.mapped_bytes / 2**20,
            "weights_copied_mib": policy.copied_bytes / 2**20}


def make_config(args):
    from llama_mpi.mpi_server.config import ServerConfig, load_config

    cfg = load_config(args.config, []) if args.config else ServerConfig()
    if args.model:
        cfg.model = os.path.expanduser(args.model)
    if args.moe_comm:
        cfg.moe_comm = args.moe_comm
    if args.dtype:
        cfg.dtype = args.dtype
    if args.no_mla:
        cfg.enable_mla = False
    if args.no_fused_moe:
        cfg.enable_fused_moe = False
    if args.quant_backend:
        cfg.quant_backend = args.quant_backend
    return cfg


def bench_single(args) -> dict:
    import torch

    from llama_mpi.models.loader import load_model
    from llama_mpi.mpi_server.settings import model_options

    torch.set_num_threads(args.threads)
    cfg = make_config(args)
    layer_devices = None
    if args.layer_split and args.layer_split > 1:
        from llama_mpi.models.loader import open_model_file
        from llama_mpi.parallel.layer_split import plan_layers

        n_layers = open_model_file(cfg.model)[1].num_layers
        layer_devices = plan_layers(n_layers, "cpu", args.layer_split).torch_devices()
    la_load = loadavg()
    anon = AnonPeak()
    t0 = time.perf_counter()
    model = load_model(cfg.model, **model_options(cfg, layer_devices=layer_devices))
    load_s = time.perf_counter() - t0

    def step(batch, pool):
        return model(batch, pool)

    tests = run_tests(model, step, args.n_prompt, args.n_gen, args.repetitions,
                      not args.no_warmup, not args.no_progress)
    return {"mode": "single" if not layer_devices else f"layer-split-{args.layer_split}",
            "ranks": 1, "threads_per_rank": torch.get_num_threads(), "moe_comm": None,
            "load_s": load_s, "loadavg_at_load": la_load, "peak_rss_mib": peak_rss_mib(),
            "peak_anon_rss_mib": anon.stop(), **weight_bytes(model),
            **model_info(cfg.model, model), "options": {"mla": cfg.enable_mla,
                                                        "fused_moe": cfg.enable_fused_moe},
            "tests": tests}


def bench_worker(args) -> dict | None:
    """One MPI rank. Rank 0 drives and returns the result; the others return None."""
    from mpi4py import MPI

    from llama_mpi.mpi_server.engine.local_executor import LocalExecutor
    from llama_mpi.mpi_server.rank_runtime import load_shard, run_worker
    from llama_mpi.parallel.bootstrap import init_parallel
    from llama_mpi.parallel.step_channel import StepChannel

    cfg = make_config(args)
    ctx = init_parallel("cpu", n_threads=args.threads_per_rank)
    world = MPI.COMM_WORLD
    channel = StepChannel(ctx.comm)
    la_load = loadavg()
    world.Barrier()
    anon = AnonPeak()
    t0 = time.perf_counter()
    model = load_shard(cfg, ctx)
    load_s = time.perf_counter() - t0
    load_all = world.gather(load_s, root=0)
    result = None
    if ctx.rank == 0:
        def step(batch, pool):
            channel.publish(batch)
            return model(batch, pool)

        try:
            tests = run_tests(model, step, args.n_prompt, args.n_gen, args.repetitions,
                              not args.no_warmup, not args.no_progress)
        finally:
            channel.publish(None)
        result = {"mode": "mpi", "ranks": ctx.world_size, "threads_per_rank": ctx.n_threads,
                  "moe_comm": cfg.moe_comm, "load_s": max(load_all),
                  "load_s_per_rank": load_all, "loadavg_at_load": la_load,
                  **model_info(cfg.model, model),
                  "options": {"mla": cfg.enable_mla, "fused_moe": cfg.enable_fused_moe},
                  "tests": tests}
    else:
        n_blocks = -(-max(args.n_prompt, args.n_gen, 1) // BLOCK_SIZE)
        run_worker(LocalExecutor(model, n_blocks, BLOCK_SIZE, n_blocks * BLOCK_SIZE, ctx.n_threads),
                   channel)
    rss = world.gather(peak_rss_mib(), root=0)
    anon_peaks = world.gather(anon.stop(), root=0)
    if ctx.rank == 0:
        result["peak_rss_mib"] = max(rss)
        result["peak_rss_mib_per_rank"] = rss
        result["peak_anon_rss_mib_per_rank"] = anon_peaks
    return result


# ------------------------------------------------------------------------------ output
def print_table(res: dict) -> None:
    size_gib = res["file_bytes"] / 2**30
    backend = (f"mpi x{res['ranks']} {res['moe_comm']}" if res["mode"] == "mpi"
               else res["mode"])
    rows = [("model", "size", "dtype", "backend", "threads", "test", "t/s (median)",
             "min", "max")]
    for t in res["tests"]:
        s = t["tokens_per_s"]
        rows.append((Path(res["model"]).name, f"{size_gib:.2f} GiB", res["dtype"], backend,
                     str(res["threads_per_rank"]), t["test"], f"{s['median']:.2f}",
                     f"{s['min']:.2f}", f"{s['max']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"

    print(line(rows[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows[1:]:
        print(line(r))
    print(f"load {res['load_s']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB"
          + (" (max over ranks)" if res["ranks"] > 1 else "")
          + (f", peak anonymous {res['peak_anon_rss_mib']:.0f} MiB"
             if "peak_anon_rss_mib" in res else "")
          + "; load avg before/after: "
          + ", ".join(f"{t['test']} {t['loadavg_before'][0]}->{t['loadavg_after'][0]}"
                      for t in res["tests"]))


def finish(res: dict, args) -> None:
    import torch

    res.update({"n_prompt": args.n_prompt, "n_gen": args.n_gen, "repetitions": args.repetitions,
                "tool": "llama-mpi run/bench.py", "torch": torch.__version__,
                "python": platform.python_version(), "cpu_count": os.cpu_count(),
                "hostname": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    try:
        res["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    print_table(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("-m", "--model", help="GGUF file (overrides the config's model)")
    ap.add_argument("--config", help="server YAML (model, dtype, enable_mla, moe_comm, ...)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2,
                    help="torch threads (single process); default 2")
    ap.add_argument("--threads-per-rank", type=int, default=None,
                    help="under --mpi: torch threads per rank (default: cores / ranks)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--no-mla", action="store_true", help="naive MLA instead of absorbed")
    ap.add_argument("--no-fused-moe", action="store_true", help="loop over experts")
    ap.add_argument("--quant-backend", choices=["auto", "native", "torch", "dequantize"])
    ap.add_argument("--mpi", type=int, default=0, help="run EP+TP over N MPI ranks")
    ap.add_argument("--moe-comm", choices=["alltoall", "allreduce"])
    ap.add_argument("--layer-split", type=int, default=0,
                    help="split layers over K (CPU) devices, llama-server's split_mode layer")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.model and not args.config:
        ap.error("give --model or --config")
    return args


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.worker:
        res = bench_worker(args)
        if res is not None:
            finish(res, args)
        return 0
    if args.mpi and args.mpi > 1:
        mpirun = REPO / ".venv" / "bin" / "mpirun"
        if not mpirun.exists():
            mpirun = Path("mpirun")
        cmd = [str(mpirun), "-np", str(args.mpi), sys.executable, str(Path(__file__).resolve()),
               "--worker", *raw]
        print("+ " + " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd)
    finish(bench_single(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
