#!/usr/bin/env python
"""Serving benchmark: N concurrent streaming clients against an OpenAI-compatible /v1/completions.

    .venv/bin/python run/bench_serving.py --url http://127.0.0.1:8080/v1/completions \\
        --prompt-len 230 --gen-len 64 --concurrency 1,2,4,8,16 --json /tmp/bench/serving.json \\
        --plot /tmp/bench/serving.png

Works against llama-server / llama-mpi-server, llama.cpp's llama-server, vLLM, ... Every
request streams (``stream: true``), with ``temperature: 0``, ``ignore_eos: true`` and
``max_tokens = --gen-len``, so every request produces exactly --gen-len tokens.

Prompts are token-id lists of exactly --prompt-len ids (pseudo-random ids in [--id-lo,
--id-hi), a different prompt per request unless --same-prompt, and a fresh --seed per run, so
prefix caching does not make prefill free); --text-prompt sends text instead (repeated
words, length approximate).

Per concurrency level N: N clients each send --rounds requests back to back. Measured:
  output tokens/s: all output tokens of the level / wall time of the level;
  TTFT: request sent -> first streamed token; TPOT: (last token - first token) / (tokens - 1);
  p50 / p99 over the level's requests; errors: failed requests or wrong token counts.
Output tokens are counted from the final ``usage`` (stream_options.include_usage) when the
server sends it, else from the number of content chunks. A server that sends no chunk for a
token whose text is empty (random-weight models whose vocabulary is mostly empty strings, e.g.
bench4's built-in vocab) hides those tokens from TTFT/TPOT: timed_chunks_per_request_mean in
the JSON shows it; --logit-bias-ids with ids of visible tokens makes every token stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_prompt(args, i: int):
    rng = random.Random(args.seed * 1_000_003 + (0 if args.same_prompt else 1000 + i))
    if args.text_prompt:
        words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat"]
        return " ".join(rng.choice(words) for _ in range(args.prompt_len))
    return [rng.randrange(args.id_lo, args.id_hi) for _ in range(args.prompt_len)]


async def one_request(client, args, prompt, headers) -> dict:
    body = {"prompt": prompt, "max_tokens": args.gen_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if args.model:
        body["model"] = args.model
    if args.logit_bias_ids:
        body["logit_bias"] = {str(i): 100.0 for i in args.logit_bias_ids}
    rec = {"ok": False, "ttft": None, "tpot": None, "n_out": 0, "latency": None, "error": None}
    t0 = time.perf_counter()
    times: list[float] = []
    usage_tokens = None
    try:
        async with client.stream("POST", args.url, json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:300]
                rec["error"] = f"HTTP {r.status_code}: {text}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                for ch in obj.get("choices") or []:
                    # a chunk per token is the norm; servers may hold back tokens whose text
                    # is empty (random-weight models with sparse vocabularies): then only the
                    # chunks seen are timed (n_chunks in the JSON says how many)
                    if ch.get("text") or ch.get("finish_reason") is None:
                        times.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - every failure is counted as an error
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    t_end = time.perf_counter()
    n = usage_tokens if usage_tokens is not None else len(times)
    rec.update(n_out=n, latency=t_end - t0, n_chunks=len(times))
    if times:
        rec["ttft"] = times[0] - t0
        if n > 1:
            rec["tpot"] = (times[-1] - times[0]) / (n - 1)
    rec["ok"] = n == args.gen_len
    if not rec["ok"]:
        rec["error"] = f"got {n} output tokens, expected {args.gen_len}"
    return rec


async def run_level(args, n_clients: int, start_index: int) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    load_before = [round(x, 2) for x in os.getloadavg()]
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def worker(c: int) -> list[dict]:
            out = []
            for k in range(args.rounds):
                idx = start_index + c * args.rounds + k
                out.append(await one_request(client, args, make_prompt(args, idx), headers))
            return out

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(worker(c) for c in range(n_clients)))
        wall = time.perf_counter() - t0
    recs = [r for rs in per_client for r in rs]
    ok = [r for r in recs if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    out_tokens = sum(r["n_out"] for r in recs)
    errors = [r["error"] for r in recs if not r["ok"]]
    chunks = [r.get("n_chunks", 0) for r in ok]
    return {"concurrency": n_clients, "requests": len(recs), "errors": len(errors),
            "error_samples": errors[:3], "wall_s": wall, "output_tokens": out_tokens,
            "output_tokens_per_s": out_tokens / wall if wall > 0 else 0.0,
            "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
            "timed_chunks_per_request_mean": statistics.fmean(chunks) if chunks else None,
            "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
            "tpot_mean_s": statistics.fmean(tpot) if tpot else None,
            "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def fmt_ms(v) -> str:
    return "-" if v is None else f"{1000 * v:.0f}"


def print_table(levels: list[dict]) -> None:
    head = ("clients", "reqs", "err", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
            "TPOT p99 ms", "load")
    rows = [head] + [(str(lv["concurrency"]), str(lv["requests"]), str(lv["errors"]),
                      f"{lv['output_tokens_per_s']:.2f}", fmt_ms(lv["ttft_p50_s"]),
                      fmt_ms(lv["ttft_p99_s"]), fmt_ms(lv["tpot_p50_s"]), fmt_ms(lv["tpot_p99_s"]),
                      f"{lv['loadavg_before'][0]}->{lv['loadavg_after'][0]}") for lv in levels]
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for j, r in enumerate(rows):
        print("| " + " | ".join(c.rjust(x) for c, x in zip(r, w, strict=True)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (x + 2) for x in w) + "|")


def plot(levels: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv["concurrency"] for lv in levels]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(xs, [lv["output_tokens_per_s"] for lv in levels], "o-")
    a1.set_xlabel("concurrent clients")
    a1.set_ylabel("aggregate output tokens/s")
    a1.set_title("throughput")
    for key, style in (("ttft_p50_s", "o-"), ("ttft_p99_s", "o--"), ("tpot_p50_s", "s-"),
                       ("tpot_p99_s", "s--")):
        ys = [lv[key] * 1000 if lv[key] is not None else float("nan") for lv in levels]
        a2.plot(xs, ys, style, label=key.replace("_s", "").replace("_", " "))
    a2.set_xlabel("concurrent clients")
    a2.set_ylabel("ms")
    a2.set_yscale("log")
    a2.set_title("latency")
    a2.legend()
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(xs, [str(x) for x in xs])
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


async def amain(args) -> dict:
    levels = []
    if args.warmup:
        import httpx

        async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout)) as client:
            w = await one_request(client, args, make_prompt(args, 10**6), {}
                                  if not args.api_key else
                                  {"Authorization": f"Bearer {args.api_key}"})
        if not w["ok"]:
            print(f"warm-up request failed: {w['error']}", file=sys.stderr)
    start = 0
    for n in args.concurrency:
        print(f"concurrency {n}: {n * args.rounds} requests ...", file=sys.stderr, flush=True)
        lv = await run_level(args, n, start)
        start += n * args.rounds
        levels.append(lv)
        print(f"  {lv['output_tokens_per_s']:.2f} out tok/s, TTFT p50 "
              f"{fmt_ms(lv['ttft_p50_s'])} ms, TPOT p50 {fmt_ms(lv['tpot_p50_s'])} ms, "
              f"errors {lv['errors']}", file=sys.stderr, flush=True)
    return {"url": args.url, "model": args.model, "prompt_len": args.prompt_len,
            "gen_len": args.gen_len, "rounds": args.rounds, "same_prompt": args.same_prompt,
            "seed": args.seed, "logit_bias_ids": args.logit_bias_ids,
            "text_prompt": args.text_prompt, "label": args.label,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "levels": levels}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--url", default="http://127.0.0.1:8080/v1/completions")
    ap.add_argument("--model", default=None, help="model name sent in the request")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", default="1,2,4,8,16",
                    type=lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--prompt-len", type=int, default=230)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="requests per client per level")
    ap.add_argument("--id-lo", type=int, default=100)
    ap.add_argument("--id-hi", type=int, default=1000, help="prompt ids < this (tiny vocab: 1024)")
    ap.add_argument("--logit-bias-ids", default=None,
                    type=lambda s: [int(x) for x in s.split(",") if x],
                    help="comma list of token ids given logit_bias +100: makes a random-weight "
                         "model emit only these (visible) tokens, so every token streams")
    ap.add_argument("--seed", type=int, default=None,
                    help="prompt seed; default: a fresh one per run (in the JSON), so that a "
                         "server's prefix cache does not hold the prompts of an earlier run")
    ap.add_argument("--same-prompt", action="store_true")
    ap.add_argument("--text-prompt", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--label", default="", help="title of the plot / tag in the JSON")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="PNG path (matplotlib)")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 2**31)
    res = asyncio.run(amain(args))
    print_table(res["levels"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            plot(res["levels"], args.plot, args.label or args.url)
            print(f"wrote {args.plot}", file=sys.stderr)
        except ImportError:
            print("matplotlib missing: pip install matplotlib (no plot written)", file=sys.stderr)
    return 1 if any(lv["errors"] for lv in res["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
