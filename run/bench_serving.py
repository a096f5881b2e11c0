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


BENCH_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["title", "kind", "year", "people", "place"],
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "kind": {"enum": ["film", "book", "song", "game"]},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "people": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "role"],
            "properties": {"name": {"type": "string", "maxLength": 16},
                           "role": {"enum": ["lead", "support", "crew"]}}}},
        "place": {"type": "object", "additionalProperties": False,
                  "required": ["city", "country"],
                  "properties": {"city": {"type": "string", "maxLength": 16},
                                 "country": {"type": "string", "maxLength": 16}}},
    },
}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}


def make_prompt(args, i: int):
    rng = random.Random(args.seed * 1_000_003 + (0 if args.same_prompt else 1000 + i))
    if args.text_prompt:
        words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat"]
        return " ".join(rng.choice(words) for _ in range(args.prompt_len))
    return [rng.randrange(args.id_lo, args.id_hi) for _ in range(args.prompt_len)]


async def one_request(client, args, prompt, headers, response_format=None,
                      max_tokens=None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens or args.gen_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if response_format is not None:  # ends when the schema is complete: fewer tokens is ok
        body["response_format"] = response_format
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
    rec["ok"] = n == body["max_tokens"] or (response_format is not None and 0 < n)
    rec["constrained"] = response_format is not None
    if not rec["ok"]:
        rec["error"] = f"got {n} output tokens, expected {body['max_tokens']}"
    return rec


async def run_level(args, n_clients: int, start_index: int, constrained: int = 0) -> dict:
    """``constrained``: how many of the clients send the JSON schema (--structured)."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    load_before = [round(x, 2) for x in os.getloadavg()]
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def worker(c: int) -> list[dict]:
            out = []
            rf = schema_format(BENCH_SCHEMA) if c < constrained else None
            rounds = 1 if args.structured else args.rounds
            for k in range(rounds):
                idx = start_index + c * rounds + k
                out.append(await one_request(client, args, make_prompt(args, idx), headers, rf))
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
    tpot_c = [r["tpot"] for r in ok if r["tpot"] is not None and r["constrained"]]
    tpot_f = [r["tpot"] for r in ok if r["tpot"] is not None and not r["constrained"]]
    n_con = [r["n_out"] for r in ok if r["constrained"]]
    return {"constrained_clients": constrained,
            "tpot_constrained_p50_s": pct(tpot_c, 50), "tpot_free_p50_s": pct(tpot_f, 50),
            "mean_tokens_constrained": statistics.fmean(n_con) if n_con else None,
            "concurrency": n_clients, "requests": len(recs), "errors": len(errors),
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


def metrics_url(url: str) -> str:
    base = url.split("/v1/")[0] if "/v1/" in url else url.rsplit("/", 1)[0]
    return base + "/metrics"


async def grammar_counters(client, args) -> dict[str, float]:
    """llama-mpi's structured-output counters from /metrics ({} from other servers)."""
    names = ("constrained_tokens_total", "constrained_step_seconds_total",
             "grammar_seconds_total")
    try:
        r = await client.get(metrics_url(args.url))
    except Exception:  # noqa: BLE001 - other servers: no figure
        return {}
    out = {}
    for line in r.text.splitlines():
        for name in names:
            if line.startswith(f"llama_mpi_{name} "):
                out[name] = float(line.split()[1])
    return out


def counter_delta(before: dict, after: dict) -> dict:
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in after if k in before}
    tokens, steps, grammar = (d.get("constrained_tokens_total", 0),
                              d.get("constrained_step_seconds_total", 0),
                              d.get("grammar_seconds_total", 0))
    return {**d, "grammar_share_of_step": grammar / steps if steps else None,
            "grammar_us_per_constrained_token": 1e6 * grammar / tokens if tokens else None}


async def schema_ttft(args, headers) -> dict:
    """First-token latency of a fresh schema (compiled on arrival) vs the same one cached."""
    import httpx

    cold, cached = [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout)) as client:
        for k in range(args.schema_ttft):
            schema = json.loads(json.dumps(BENCH_SCHEMA))
            tag = f"x{args.seed}_{k}"  # a property no earlier request had: a cache miss
            schema["properties"][tag] = {"type": "boolean"}
            schema["required"] = [*schema["required"], tag]
            for j, bucket in enumerate((cold, cached)):  # own prompts: no prefix-cache help
                rec = await one_request(client, args, make_prompt(args, 2 * 10**6 + 2 * k + j),
                                        headers, schema_format(schema), max_tokens=1)
                if rec["ttft"] is not None:
                    bucket.append(rec["ttft"])
    return {"runs": args.schema_ttft, "ttft_cold_p50_s": pct(cold, 50),
            "ttft_cached_p50_s": pct(cached, 50), "ttft_cold_s": cold, "ttft_cached_s": cached}


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


async def amain_structured(args) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    out: dict = {"url": args.url, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                 "rounds": args.rounds, "seed": args.seed, "label": args.label,
                 "schema_share": args.schema_share, "loadavg_start": list(os.getloadavg()),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "levels": []}
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout)) as client:
        if args.warmup:  # one free and one constrained request: the schema is then cached
            await one_request(client, args, make_prompt(args, 10**6), headers)
            await one_request(client, args, make_prompt(args, 10**6 + 1), headers,
                              schema_format(BENCH_SCHEMA))
        if args.schema_ttft:
            out["schema_ttft"] = await schema_ttft(args, headers)
            st = out["schema_ttft"]
            print(f"schema TTFT p50: cold {fmt_ms(st['ttft_cold_p50_s'])} ms, cached "
                  f"{fmt_ms(st['ttft_cached_p50_s'])} ms", file=sys.stderr, flush=True)
        start = 0
        for n in args.concurrency:
            n_c = max(1, round(n * args.schema_share))
            free_rounds, con_rounds, deltas = [], [], []
            for _ in range(args.rounds):
                free_rounds.append(await run_level(args, n, start))
                start += n
                before = await grammar_counters(client, args)
                con_rounds.append(await run_level(args, n, start, constrained=n_c))
                deltas.append(counter_delta(before, await grammar_counters(client, args)))
                start += n
            share = [d["grammar_share_of_step"] for d in deltas if d.get("grammar_share_of_step")]
            per_tok = [d["grammar_us_per_constrained_token"] for d in deltas
                       if d.get("grammar_us_per_constrained_token")]
            tpot_free = [r["tpot_free_p50_s"] for r in free_rounds if r["tpot_free_p50_s"]]
            tpot_con = [r["tpot_constrained_p50_s"] for r in con_rounds
                        if r["tpot_constrained_p50_s"]]
            lv = {"concurrency": n, "constrained_clients": n_c,
                  "grammar_share_of_step_p50": pct(share, 50),
                  "grammar_us_per_constrained_token_p50": pct(per_tok, 50),
                  "tpot_free_p50_s": pct(tpot_free, 50),
                  "tpot_constrained_p50_s": pct(tpot_con, 50),
                  "errors": sum(r["errors"] for r in free_rounds + con_rounds),
                  "free_rounds": free_rounds, "constrained_rounds": con_rounds,
                  "counters": deltas}
            out["levels"].append(lv)
            share_p50 = lv["grammar_share_of_step_p50"]
            print(f"concurrency {n} ({n_c} constrained): grammar "
                  f"{'-' if share_p50 is None else f'{100 * share_p50:.2f} %'} of the step, "
                  f"{lv['grammar_us_per_constrained_token_p50'] or 0:.0f} us per constrained "
                  f"token; TPOT p50 free {fmt_ms(lv['tpot_free_p50_s'])} ms, constrained "
                  f"{fmt_ms(lv['tpot_constrained_p50_s'])} ms; errors {lv['errors']}",
                  file=sys.stderr, flush=True)
    out["loadavg_end"] = list(os.getloadavg())
    return out


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
