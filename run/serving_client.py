#!/usr/bin/env python
"""The client side of run/bench_serving.py: prompts, one streamed request with its timings,
and a concurrency level of clients (free, or some sending the benchmark's JSON schema)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time


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
