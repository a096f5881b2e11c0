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

--structured (structured outputs, issue 12): each level runs --rounds pairs of rounds, a free
round then a constrained one (interleaved, so machine noise hits both alike); in a
constrained round a --schema-share of the clients send ``response_format`` with a JSON schema
(nested objects, an array, enums, bounded strings: BENCH_SCHEMA) and stop when it is
complete. From the server's /metrics (llama-mpi only) it reports the time of the grammar masks
and accepts as a share of the steps that sampled a constrained row, and per constrained
token; TPOT of constrained vs free requests. --schema-ttft K first measures, at idle, K times
the first-token latency of a never-seen schema (cold: compiled on arrival) and of the same
schema again (cached):

    .venv/bin/python run/bench_serving.py --url http://127.0.0.1:8080/v1/completions \
        --structured --concurrency 8 --rounds 3 --gen-len 64 --schema-ttft 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving_structured import amain_structured  # noqa: E402
from serving_client import fmt_ms, make_prompt, one_request, run_level  # noqa: E402


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
    if args.structured:
        return await amain_structured(args)
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
    ap.add_argument("--structured", action="store_true",
                    help="free and JSON-schema rounds interleaved (see above)")
    ap.add_argument("--schema-share", type=float, default=1.0,
                    help="--structured: share of the clients that send the schema")
    ap.add_argument("--schema-ttft", type=int, default=0,
                    help="--structured: cold vs cached schema first-token latency, K times")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 2**31)
    res = asyncio.run(amain(args))
    if args.structured:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 1 if any(lv["errors"] for lv in res["levels"]) else 0
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
