#!/usr/bin/env python
"""run/bench_serving.py --structured: free and JSON-schema rounds interleaved, the grammar's
share of the step from llama-mpi's /metrics, and cold vs cached schema first-token latency."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_client import (  # noqa: E402
    BENCH_SCHEMA,
    fmt_ms,
    make_prompt,
    one_request,
    pct,
    run_level,
    schema_format,
)


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
